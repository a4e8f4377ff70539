from paddle_llm.cli import main

raise SystemExit(main())
