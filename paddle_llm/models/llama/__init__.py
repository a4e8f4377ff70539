"""The Llama family (Llama-2, Llama-3.x): what is specific to it lives in this package."""
