// Fused fp32 CPU kernels for the hot composites of Llama, ChatGLM and ChatGLM2 training, as Paddle custom ops.
//
// Why: Paddle 3.3.1's CPU kernels for these composites are one op per elementwise step, single-threaded, with
// slow broadcast and transcendental paths (sigmoid: 1.5 ns per value, softmax over a 2000-wide row: 2.2 ns per
// value). Each kernel here does its composite in one pass over memory, vectorised (glibc's vector expf) and split
// over the OpenMP threads the process was given. paddle_llm/cpu/kernels.py compiles this file on first use
// and falls back to the pure-Paddle composites in cpu_fast.py when it cannot.
//
// Every backward is registered with its forward, so Paddle's autograd calls it as it would a built-in op's.

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "paddle/extension.h"

namespace {

// Below this many values a fork/join costs more than the second thread saves.
constexpr int64_t kMinValuesPerParallelRegion = 1 << 14;

int ThreadsFor(int64_t values) {
  return values >= kMinValuesPerParallelRegion ? omp_get_max_threads() : 1;
}

void CheckFloat32OnCpu(const paddle::Tensor& tensor, const char* name) {
  PD_CHECK(tensor.is_cpu(), name, " must be a CPU tensor");
  PD_CHECK(tensor.dtype() == paddle::DataType::FLOAT32, name, " must be float32");
}

std::vector<int64_t> LeadingShape(const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end() - 1);
}

// Inputs may be strided views (Paddle's stride kernels); the loops below index dense row-major memory.
paddle::Tensor Dense(const paddle::Tensor& tensor) { return tensor.is_contiguous() ? tensor : tensor.contiguous(); }

inline float Sigmoid(float value) { return 1.0f / (1.0f + std::exp(-value)); }

}  // namespace

// ----- RMSNorm: out = (x * rsqrt(mean(x^2) + epsilon)) * weight, over the last axis -----

std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x_input, const paddle::Tensor& weight_input,
                                           float epsilon) {
  const paddle::Tensor x = Dense(x_input);
  const paddle::Tensor weight = Dense(weight_input);
  CheckFloat32OnCpu(x, "rms_norm x");
  CheckFloat32OnCpu(weight, "rms_norm weight");
  const int64_t hidden = x.shape().back();
  PD_CHECK(weight.numel() == hidden, "rms_norm weight must have ", hidden, " values");
  const int64_t rows = x.numel() / hidden;
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  auto inverse_rms = paddle::empty(LeadingShape(x.shape()), x.dtype(), x.place());
  const float* x_data = x.data<float>();
  const float* weight_data = weight.data<float>();
  float* out_data = out.data<float>();
  float* inverse_rms_data = inverse_rms.data<float>();
#pragma omp parallel for num_threads(ThreadsFor(x.numel()))
  for (int64_t row = 0; row < rows; ++row) {
    const float* in = x_data + row * hidden;
    float* result = out_data + row * hidden;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) squares += in[i] * in[i];
    const float scale = 1.0f / std::sqrt(squares / hidden + epsilon);
    inverse_rms_data[row] = scale;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) result[i] = (scale * in[i]) * weight_data[i];
  }
  return {out, inverse_rms};
}

// grad_x = r * (g*w - n * mean(g*w*n)), grad_weight = sum over rows of g*n, where n = x*r is the normalised input.
std::vector<paddle::Tensor> RmsNormBackward(const paddle::Tensor& x_input, const paddle::Tensor& weight_input,
                                            const paddle::Tensor& inverse_rms_input,
                                            const paddle::Tensor& grad_out_input,
                                            float epsilon) {
  const paddle::Tensor x = Dense(x_input);
  const paddle::Tensor weight = Dense(weight_input);
  const paddle::Tensor inverse_rms = Dense(inverse_rms_input);
  const paddle::Tensor grad_out = Dense(grad_out_input);
  const int64_t hidden = x.shape().back();
  const int64_t rows = x.numel() / hidden;
  auto grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* x_data = x.data<float>();
  const float* weight_data = weight.data<float>();
  const float* inverse_rms_data = inverse_rms.data<float>();
  const float* grad_data = grad_out.data<float>();
  float* grad_x_data = grad_x.data<float>();
  const int threads = ThreadsFor(x.numel());
  // One partial weight gradient per thread, summed afterwards in a fixed order (deterministic).
  std::vector<float> partial_grad_weight(static_cast<size_t>(threads) * hidden, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* my_grad_weight = partial_grad_weight.data() + static_cast<size_t>(omp_get_thread_num()) * hidden;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float* in = x_data + row * hidden;
      const float* grad = grad_data + row * hidden;
      float* result = grad_x_data + row * hidden;
      const float scale = inverse_rms_data[row];
      float projection = 0.0f;
#pragma omp simd reduction(+ : projection)
      for (int64_t i = 0; i < hidden; ++i) projection += grad[i] * weight_data[i] * in[i];
      projection = projection * scale / hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        const float normalized = in[i] * scale;
        result[i] = scale * (grad[i] * weight_data[i] - normalized * projection);
        my_grad_weight[i] += grad[i] * normalized;
      }
    }
  }
  auto grad_weight = paddle::empty(weight.shape(), weight.dtype(), weight.place());
  float* grad_weight_data = grad_weight.data<float>();
  for (int64_t i = 0; i < hidden; ++i) grad_weight_data[i] = 0.0f;
  for (int thread = 0; thread < threads; ++thread) {
    const float* partial = partial_grad_weight.data() + static_cast<size_t>(thread) * hidden;
    for (int64_t i = 0; i < hidden; ++i) grad_weight_data[i] += partial[i];
  }
  return {grad_x, grad_weight};
}

std::vector<std::vector<int64_t>> RmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>& weight) {
  return {x, LeadingShape(x)};
}

std::vector<paddle::DataType> RmsNormDtype(const paddle::DataType& x, const paddle::DataType& weight) {
  return {x, x};
}

PD_BUILD_OP(paddle_llm_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out", "InverseRms"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormDtype));

PD_BUILD_GRAD_OP(paddle_llm_rms_norm)
    .Inputs({"X", "Weight", "InverseRms", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(RmsNormBackward));

// ----- SwiGLU: out = silu(gate) * up -----

std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& gate_input, const paddle::Tensor& up_input) {
  const paddle::Tensor gate = Dense(gate_input);
  const paddle::Tensor up = Dense(up_input);
  CheckFloat32OnCpu(gate, "swiglu gate");
  CheckFloat32OnCpu(up, "swiglu up");
  PD_CHECK(gate.shape() == up.shape(), "swiglu gate and up must have the same shape");
  auto out = paddle::empty(gate.shape(), gate.dtype(), gate.place());
  const float* gate_data = gate.data<float>();
  const float* up_data = up.data<float>();
  float* out_data = out.data<float>();
  const int64_t values = gate.numel();
#pragma omp parallel for simd num_threads(ThreadsFor(values))
  for (int64_t i = 0; i < values; ++i) out_data[i] = gate_data[i] * Sigmoid(gate_data[i]) * up_data[i];
  return {out};
}

// d silu(g) / dg = s * (1 + g * (1 - s)) with s = sigmoid(g); sigmoid is recomputed rather than stored.
std::vector<paddle::Tensor> SwigluBackward(const paddle::Tensor& gate_input, const paddle::Tensor& up_input,
                                           const paddle::Tensor& grad_out_input) {
  const paddle::Tensor gate = Dense(gate_input);
  const paddle::Tensor up = Dense(up_input);
  const paddle::Tensor grad_out = Dense(grad_out_input);
  auto grad_gate = paddle::empty(gate.shape(), gate.dtype(), gate.place());
  auto grad_up = paddle::empty(up.shape(), up.dtype(), up.place());
  const float* gate_data = gate.data<float>();
  const float* up_data = up.data<float>();
  const float* grad_data = grad_out.data<float>();
  float* grad_gate_data = grad_gate.data<float>();
  float* grad_up_data = grad_up.data<float>();
  const int64_t values = gate.numel();
#pragma omp parallel for simd num_threads(ThreadsFor(values))
  for (int64_t i = 0; i < values; ++i) {
    const float g = gate_data[i];
    const float s = Sigmoid(g);
    grad_gate_data[i] = grad_data[i] * up_data[i] * s * (1.0f + g * (1.0f - s));
    grad_up_data[i] = grad_data[i] * g * s;
  }
  return {grad_gate, grad_up};
}

std::vector<std::vector<int64_t>> SameShapeAsFirst(const std::vector<int64_t>& first, const std::vector<int64_t>&) {
  return {first};
}

std::vector<paddle::DataType> SameDtypeAsFirst(const paddle::DataType& first, const paddle::DataType&) {
  return {first};
}

PD_BUILD_OP(paddle_llm_swiglu)
    .Inputs({"Gate", "Up"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShapeAsFirst))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtypeAsFirst));

PD_BUILD_GRAD_OP(paddle_llm_swiglu)
    .Inputs({"Gate", "Up", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Gate"), paddle::Grad("Up")})
    .SetKernelFn(PD_KERNEL(SwigluBackward));

// ----- Rotary embedding: out = x * cos + swap(x) * sign_folded_sin -----
//
// x is [d0, d1, heads, head_dim]; cos and sin are [d0 or 1, d1, head_dim], shared by the heads. swap() exchanges
// the two halves of each of `blocks` equal blocks of head_dim (Llama: 1 block; ChatGLM-6B's 2-D rotary: 2), and
// the sign of rotate-half is folded into sin, so swap is its own inverse and the backward has the same form.

namespace {

struct RotaryIndexing {
  int64_t outer, inner_rows, heads, head_dim, half_block, block;
  bool broadcast_first_axis;
};

RotaryIndexing CheckRotary(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin,
                           int blocks) {
  CheckFloat32OnCpu(x, "rotary x");
  CheckFloat32OnCpu(cos, "rotary cos");
  CheckFloat32OnCpu(sin, "rotary sin");
  const auto& shape = x.shape();
  PD_CHECK(shape.size() == 4, "rotary x must be [d0, d1, heads, head_dim]");
  PD_CHECK(cos.shape() == sin.shape(), "rotary cos and sin must have the same shape");
  PD_CHECK(cos.shape().size() == 3 && cos.shape()[1] == shape[1] && cos.shape()[2] == shape[3] &&
               (cos.shape()[0] == shape[0] || cos.shape()[0] == 1),
           "rotary cos must be [d0 or 1, d1, head_dim]");
  PD_CHECK(blocks > 0 && shape[3] % (2 * blocks) == 0, "rotary head_dim must split into 2 x blocks halves");
  const int64_t block = shape[3] / blocks;
  return {shape[0] * shape[1], shape[1], shape[2], shape[3], block / 2, block, cos.shape()[0] == 1};
}

// out[k] = a[k] * cos[k] + b[partner(k)] * sin_at(k), over one [heads, head_dim] slab; the forward and the backward
// differ only in whether sin is read at k (forward) or at the partner (backward).
template <bool kSinAtPartner>
void RotarySlab(const RotaryIndexing& ix, const float* in, const float* cos, const float* sin, float* out) {
  for (int64_t head = 0; head < ix.heads; ++head) {
    const float* x = in + head * ix.head_dim;
    float* y = out + head * ix.head_dim;
    for (int64_t start = 0; start < ix.head_dim; start += ix.block) {
      const int64_t middle = start + ix.half_block;
#pragma omp simd
      for (int64_t i = 0; i < ix.half_block; ++i) {
        const int64_t low = start + i, high = middle + i;
        y[low] = x[low] * cos[low] + x[high] * (kSinAtPartner ? sin[high] : sin[low]);
        y[high] = x[high] * cos[high] + x[low] * (kSinAtPartner ? sin[low] : sin[high]);
      }
    }
  }
}

template <bool kSinAtPartner>
paddle::Tensor Rotary(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin, int blocks) {
  const RotaryIndexing ix = CheckRotary(x, cos, sin, blocks);
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* x_data = x.data<float>();
  const float* cos_data = cos.data<float>();
  const float* sin_data = sin.data<float>();
  float* out_data = out.data<float>();
  const int64_t slab = ix.heads * ix.head_dim;
#pragma omp parallel for num_threads(ThreadsFor(x.numel()))
  for (int64_t row = 0; row < ix.outer; ++row) {
    const int64_t table_row = ix.broadcast_first_axis ? row % ix.inner_rows : row;
    RotarySlab<kSinAtPartner>(ix, x_data + row * slab, cos_data + table_row * ix.head_dim,
                              sin_data + table_row * ix.head_dim, out_data + row * slab);
  }
  return out;
}

}  // namespace

std::vector<paddle::Tensor> RotaryForward(const paddle::Tensor& x_input, const paddle::Tensor& cos_input,
                                          const paddle::Tensor& sin_input, int blocks) {
  const paddle::Tensor x = Dense(x_input);
  const paddle::Tensor cos = Dense(cos_input);
  const paddle::Tensor sin = Dense(sin_input);
  return {Rotary<false>(x, cos, sin, blocks)};
}

// The transpose of "swap(x) * sin" is "swap(g * sin)", i.e. g at the partner times sin at the partner.
std::vector<paddle::Tensor> RotaryBackward(const paddle::Tensor& cos_input, const paddle::Tensor& sin_input,
                                           const paddle::Tensor& grad_out_input, int blocks) {
  const paddle::Tensor cos = Dense(cos_input);
  const paddle::Tensor sin = Dense(sin_input);
  const paddle::Tensor grad_out = Dense(grad_out_input);
  return {Rotary<true>(grad_out, cos, sin, blocks)};
}

std::vector<std::vector<int64_t>> RotaryShape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                              const std::vector<int64_t>&) {
  return {x};
}

std::vector<paddle::DataType> RotaryDtype(const paddle::DataType& x, const paddle::DataType&,
                                          const paddle::DataType&) {
  return {x};
}

PD_BUILD_OP(paddle_llm_rotary)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Out"})
    .Attrs({"blocks: int"})
    .SetKernelFn(PD_KERNEL(RotaryForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RotaryShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RotaryDtype));

PD_BUILD_GRAD_OP(paddle_llm_rotary)
    .Inputs({"Cos", "Sin", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"blocks: int"})
    .SetKernelFn(PD_KERNEL(RotaryBackward));

// ----- Attention probabilities: softmax(scores + mask) over the last axis -----
//
// scores [b, heads, q, k]; the additive mask is [b or 1, heads or 1, q, k] and is read in place, not expanded.

namespace {

// Masked scores (a mask of finfo.min) sent glibc's vector expf down its scalar path for out-of-range inputs: 3.2 ns
// per value instead of 0.7. Exponents are clamped here instead. e^-70 is below 1e-30, invisible in a float32 sum
// whose largest term is 1, so the row's total is unchanged and a probability moves by less than 1e-30.
constexpr float kSmallestExponent = -70.0f;

// out = softmax(in + bias) over one row; out may be in.
void SoftmaxRow(const float* in, const float* bias, float* out, int64_t keys) {
  float largest = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : largest)
  for (int64_t i = 0; i < keys; ++i) largest = std::max(largest, in[i] + bias[i]);
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < keys; ++i) {
    out[i] = std::exp(std::max(in[i] + bias[i] - largest, kSmallestExponent));
    total += out[i];
  }
  const float inverse_total = 1.0f / total;
#pragma omp simd
  for (int64_t i = 0; i < keys; ++i) out[i] *= inverse_total;
}

// out = p * (grad - sum(grad * p)), the softmax backward over one row; out may be grad.
void SoftmaxGradRow(const float* p, const float* grad, float* out, int64_t keys) {
  float weighted = 0.0f;
#pragma omp simd reduction(+ : weighted)
  for (int64_t i = 0; i < keys; ++i) weighted += grad[i] * p[i];
#pragma omp simd
  for (int64_t i = 0; i < keys; ++i) out[i] = p[i] * (grad[i] - weighted);
}

bool MaskBroadcastsTo(const std::vector<int64_t>& mask_shape, int64_t batch, int64_t heads, int64_t queries,
                      int64_t keys) {
  return mask_shape.size() == 4 && (mask_shape[0] == batch || mask_shape[0] == 1) &&
         (mask_shape[1] == heads || mask_shape[1] == 1) && mask_shape[2] == queries && mask_shape[3] == keys;
}

// The first row of mask[batch, head] (a [queries, keys] block), where the mask may broadcast over batch and heads.
const float* MaskBlock(const float* mask_data, const std::vector<int64_t>& mask_shape, int64_t batch, int64_t head) {
  const int64_t block = (mask_shape[0] == 1 ? 0 : batch) * mask_shape[1] + (mask_shape[1] == 1 ? 0 : head);
  return mask_data + block * mask_shape[2] * mask_shape[3];
}

}  // namespace

std::vector<paddle::Tensor> MaskedSoftmaxForward(const paddle::Tensor& scores_input, const paddle::Tensor& mask_input) {
  const paddle::Tensor scores = Dense(scores_input);
  const paddle::Tensor mask = Dense(mask_input);
  CheckFloat32OnCpu(scores, "masked_softmax scores");
  CheckFloat32OnCpu(mask, "masked_softmax mask");
  const auto& shape = scores.shape();
  const auto& mask_shape = mask.shape();
  PD_CHECK(shape.size() == 4, "masked_softmax scores must be 4-D");
  PD_CHECK(MaskBroadcastsTo(mask_shape, shape[0], shape[1], shape[2], shape[3]),
           "masked_softmax mask must be [batch or 1, heads or 1, queries, keys]");
  auto probabilities = paddle::empty(shape, scores.dtype(), scores.place());
  const int64_t heads = shape[1], queries = shape[2], keys = shape[3];
  const int64_t rows = scores.numel() / keys;
  const float* score_data = scores.data<float>();
  const float* mask_data = mask.data<float>();
  float* out_data = probabilities.data<float>();
#pragma omp parallel for num_threads(ThreadsFor(scores.numel()))
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t query = row % queries, head = (row / queries) % heads, batch = row / (queries * heads);
    const float* bias = MaskBlock(mask_data, mask_shape, batch, head) + query * keys;
    SoftmaxRow(score_data + row * keys, bias, out_data + row * keys, keys);
  }
  return {probabilities};
}

// grad_scores = p * (g - sum(g * p)); the mask gets no gradient.
std::vector<paddle::Tensor> MaskedSoftmaxBackward(const paddle::Tensor& probabilities_input,
                                                  const paddle::Tensor& grad_out_input) {
  const paddle::Tensor probabilities = Dense(probabilities_input);
  const paddle::Tensor grad_out = Dense(grad_out_input);
  auto grad_scores = paddle::empty(probabilities.shape(), probabilities.dtype(), probabilities.place());
  const int64_t keys = probabilities.shape().back();
  const int64_t rows = probabilities.numel() / keys;
  const float* p_data = probabilities.data<float>();
  const float* grad_data = grad_out.data<float>();
  float* out_data = grad_scores.data<float>();
#pragma omp parallel for num_threads(ThreadsFor(probabilities.numel()))
  for (int64_t row = 0; row < rows; ++row) {
    SoftmaxGradRow(p_data + row * keys, grad_data + row * keys, out_data + row * keys, keys);
  }
  return {grad_scores};
}

PD_BUILD_OP(paddle_llm_masked_softmax)
    .Inputs({"Scores", "Mask"})
    .Outputs({"Probabilities"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShapeAsFirst))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtypeAsFirst));

PD_BUILD_GRAD_OP(paddle_llm_masked_softmax)
    .Inputs({"Probabilities", paddle::Grad("Probabilities")})
    .Outputs({paddle::Grad("Scores")})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxBackward));

// ----- Attention: context = softmax(scale * q k^T + mask) v, straight from the projections' layout -----
//
// Why: as separate Paddle ops (transposes to [b, h, s, d], a scale, two batched matmuls and the softmax, each with
// its backward) one layer of 512-wide Llama attention took 17.8 ms per training step, 45 GFLOP/s. Here each
// (batch, head) pair is one task: its q, k, v rows are read in place with a leading dimension (MKL's sgemm takes
// strided rows, so no transpose is ever materialised), the [queries, keys] block stays in cache between the
// matmuls and the softmax, and the tasks are split over the OpenMP threads (inside an active parallel region MKL runs each matmul on
// the calling thread).
//
// q [b, s, hq, d], k and v [b, s_kv, hkv, d] (or [s, b, ., d] with sequence_first, ChatGLM's layout); hq is a
// multiple of hkv and query head j reads key/value head j / (hq / hkv). The mask is additive, [b or 1, hq or 1,
// s, s_kv]. Outputs: context in q's layout, and the probabilities [b, hq, s, s_kv], kept for the backward.
// Built only when Paddle's wheel ships MKL (libmklml_intel.so); cpu_fast falls back to the composites otherwise.

#ifdef PADDLE_LLM_WITH_MKL

// Paddle's wheel ships MKL's library but not its headers.
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Where the [sequence, head_dim] matrix of one (batch, head) pair starts, and the distance between its rows.
struct HeadsLayout {
  int64_t batch, sequence, heads, head_dim;
  bool sequence_first;

  HeadsLayout(const std::vector<int64_t>& shape, bool sequence_first_axis)
      : batch(shape[sequence_first_axis ? 1 : 0]),
        sequence(shape[sequence_first_axis ? 0 : 1]),
        heads(shape[2]),
        head_dim(shape[3]),
        sequence_first(sequence_first_axis) {}

  int64_t Offset(int64_t batch_index, int64_t head) const {
    return (sequence_first ? batch_index * heads : batch_index * sequence * heads) * head_dim + head * head_dim;
  }
  int RowStride() const { return static_cast<int>((sequence_first ? batch * heads : heads) * head_dim); }
};

struct AttentionShapes {
  HeadsLayout query, key;
  int64_t group;
};

AttentionShapes CheckAttentionInputs(const paddle::Tensor& query, const paddle::Tensor& key,
                                     const paddle::Tensor& value, const paddle::Tensor& mask, bool sequence_first) {
  CheckFloat32OnCpu(query, "attention query");
  CheckFloat32OnCpu(key, "attention key");
  CheckFloat32OnCpu(value, "attention value");
  CheckFloat32OnCpu(mask, "attention mask");
  PD_CHECK(query.shape().size() == 4 && key.shape().size() == 4, "attention query, key and value must be 4-D");
  PD_CHECK(key.shape() == value.shape(), "attention key and value must have the same shape");
  const HeadsLayout q(query.shape(), sequence_first), k(key.shape(), sequence_first);
  PD_CHECK(q.batch == k.batch && q.head_dim == k.head_dim, "attention query and key differ in batch or head size");
  PD_CHECK(q.heads % k.heads == 0, "attention query heads must be a multiple of key/value heads");
  PD_CHECK(MaskBroadcastsTo(mask.shape(), q.batch, q.heads, q.sequence, k.sequence),
           "attention mask must be [batch or 1, heads or 1, queries, keys]");
  return {q, k, q.heads / k.heads};
}

// Tasks are whole (batch, head) pairs; with fewer tasks than threads, MKL threads each matmul instead.
int ThreadsForTasks(int64_t tasks) { return tasks >= omp_get_max_threads() ? omp_get_max_threads() : 1; }

}  // namespace

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& query_input, const paddle::Tensor& key_input,
                                             const paddle::Tensor& value_input, const paddle::Tensor& mask_input,
                                             float scale, bool sequence_first) {
  const paddle::Tensor query = Dense(query_input), key = Dense(key_input), value = Dense(value_input);
  const paddle::Tensor mask = Dense(mask_input);
  const AttentionShapes shapes = CheckAttentionInputs(query, key, value, mask, sequence_first);
  const HeadsLayout& q = shapes.query;
  const HeadsLayout& k = shapes.key;
  auto context = paddle::empty(query.shape(), query.dtype(), query.place());
  auto probabilities = paddle::empty({q.batch, q.heads, q.sequence, k.sequence}, query.dtype(), query.place());
  const float* q_data = query.data<float>();
  const float* k_data = key.data<float>();
  const float* v_data = value.data<float>();
  const float* mask_data = mask.data<float>();
  float* context_data = context.data<float>();
  float* p_data = probabilities.data<float>();
  const std::vector<int64_t> mask_shape = mask.shape();
  const int64_t block = q.sequence * k.sequence;
  const int64_t tasks = q.batch * q.heads;
  const int threads = ThreadsForTasks(tasks);
#pragma omp parallel num_threads(threads)
  {
    // schedule(static): with GCC's dynamic-schedule entry points, Paddle's libiomp5 gave every thread every task.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t batch = task / q.heads, head = task % q.heads, kv_head = head / shapes.group;
      float* p = p_data + task * block;
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, q.sequence, k.sequence, q.head_dim, scale,
                  q_data + q.Offset(batch, head), q.RowStride(), k_data + k.Offset(batch, kv_head), k.RowStride(),
                  0.0f, p, k.sequence);
      const float* bias = MaskBlock(mask_data, mask_shape, batch, head);
      for (int64_t row = 0; row < q.sequence; ++row) {
        SoftmaxRow(p + row * k.sequence, bias + row * k.sequence, p + row * k.sequence, k.sequence);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, q.sequence, q.head_dim, k.sequence, 1.0f, p, k.sequence,
                  v_data + k.Offset(batch, kv_head), k.RowStride(), 0.0f, context_data + q.Offset(batch, head),
                  q.RowStride());
    }
  }
  return {context, probabilities};
}

// With s = softmax scores' gradient, ds = p * (dp - sum(dp * p)) where dp = dcontext v^T; then dq = scale ds k,
// dk = scale ds^T q and dv = p^T dcontext, the last two summed over the query heads sharing a key/value head (one
// task per key/value head, so no two threads write the same rows).
std::vector<paddle::Tensor> AttentionBackward(const paddle::Tensor& query_input, const paddle::Tensor& key_input,
                                              const paddle::Tensor& value_input,
                                              const paddle::Tensor& probabilities_input,
                                              const paddle::Tensor& grad_context_input, float scale,
                                              bool sequence_first) {
  const paddle::Tensor query = Dense(query_input), key = Dense(key_input), value = Dense(value_input);
  const paddle::Tensor probabilities = Dense(probabilities_input), grad_context = Dense(grad_context_input);
  const HeadsLayout q(query.shape(), sequence_first), k(key.shape(), sequence_first);
  const int64_t group = q.heads / k.heads;
  auto grad_query = paddle::empty(query.shape(), query.dtype(), query.place());
  auto grad_key = paddle::empty(key.shape(), key.dtype(), key.place());
  auto grad_value = paddle::empty(value.shape(), value.dtype(), value.place());
  const float* q_data = query.data<float>();
  const float* k_data = key.data<float>();
  const float* v_data = value.data<float>();
  const float* p_data = probabilities.data<float>();
  const float* grad_data = grad_context.data<float>();
  float* grad_q_data = grad_query.data<float>();
  float* grad_k_data = grad_key.data<float>();
  float* grad_v_data = grad_value.data<float>();
  const int64_t block = q.sequence * k.sequence;
  const int64_t tasks = k.batch * k.heads;
  const int threads = ThreadsForTasks(tasks);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> grad_scores(static_cast<size_t>(block));
    float* ds = grad_scores.data();
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t batch = task / k.heads, kv_head = task % k.heads;
      const float* k_rows = k_data + k.Offset(batch, kv_head);
      const float* v_rows = v_data + k.Offset(batch, kv_head);
      float* grad_k_rows = grad_k_data + k.Offset(batch, kv_head);
      float* grad_v_rows = grad_v_data + k.Offset(batch, kv_head);
      for (int64_t member = 0; member < group; ++member) {
        const int64_t head = kv_head * group + member;
        const float* p = p_data + (batch * q.heads + head) * block;
        const float* grad_rows = grad_data + q.Offset(batch, head);
        const float beta = member == 0 ? 0.0f : 1.0f;  // the first query head of a group overwrites, the rest add
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, q.sequence, k.sequence, q.head_dim, 1.0f, grad_rows, q.RowStride(),
                    v_rows, k.RowStride(), 0.0f, ds, k.sequence);
        for (int64_t row = 0; row < q.sequence; ++row) {
          SoftmaxGradRow(p + row * k.sequence, ds + row * k.sequence, ds + row * k.sequence, k.sequence);
        }
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, q.sequence, q.head_dim, k.sequence, scale, ds, k.sequence, k_rows,
                    k.RowStride(), 0.0f, grad_q_data + q.Offset(batch, head), q.RowStride());
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, k.sequence, q.head_dim, q.sequence, scale, ds, k.sequence,
                    q_data + q.Offset(batch, head), q.RowStride(), beta, grad_k_rows, k.RowStride());
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, k.sequence, q.head_dim, q.sequence, 1.0f, p, k.sequence, grad_rows,
                    q.RowStride(), beta, grad_v_rows, k.RowStride());
      }
    }
  }
  return {grad_query, grad_key, grad_value};
}

std::vector<std::vector<int64_t>> AttentionShape(const std::vector<int64_t>& query, const std::vector<int64_t>& key,
                                                 const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                 float, bool sequence_first) {
  const HeadsLayout q(query, sequence_first), k(key, sequence_first);
  return {query, {q.batch, q.heads, q.sequence, k.sequence}};
}

std::vector<paddle::DataType> AttentionDtype(const paddle::DataType& query, const paddle::DataType&,
                                             const paddle::DataType&, const paddle::DataType&) {
  return {query, query};
}

PD_BUILD_OP(paddle_llm_attention)
    .Inputs({"Query", "Key", "Value", "Mask"})
    .Outputs({"Context", "Probabilities"})
    .Attrs({"scale: float", "sequence_first: bool"})
    .SetKernelFn(PD_KERNEL(AttentionForward))
    .SetInferShapeFn(PD_INFER_SHAPE(AttentionShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AttentionDtype));

PD_BUILD_GRAD_OP(paddle_llm_attention)
    .Inputs({"Query", "Key", "Value", "Probabilities", paddle::Grad("Context")})
    .Outputs({paddle::Grad("Query"), paddle::Grad("Key"), paddle::Grad("Value")})
    .Attrs({"scale: float", "sequence_first: bool"})
    .SetKernelFn(PD_KERNEL(AttentionBackward));

#endif  // PADDLE_LLM_WITH_MKL

// ----- Weight matmul over panel-packed weights: out = x w, for the exported decoding step -----
//
// Why: a decoding step multiplies a few rows by each weight matrix. MKL's sgemm handles that shape poorly (on a
// Zen 4 core [8, 512] @ [512, 2688] took 481-932 us; here 246 us built for AVX-512): its no-copy path walks the
// row-major weight with a stride. Here the weight is stored at export in panels of kPanelColumns columns,
// [panels, k, kPanelColumns] with the last panel zero-padded (paddle_llm/cpu/kernels.py: pack_panels), so each
// panel is one contiguous stream, read once per block of kRowBlock rows while the block's sums stay in registers.
// The layout does not depend on the CPU; the register blocking does, and is fixed by the instruction set this file
// is compiled for.

namespace {

constexpr int64_t kPanelColumns = 16;

#if defined(__AVX512F__)
typedef float PanelVector __attribute__((vector_size(64)));
constexpr int kRowBlock = 12;  // 12 rows x 2 panels = 24 of the 32 vector registers
constexpr int kPanelsPerBlock = 2;
#elif defined(__AVX2__)
typedef float PanelVector __attribute__((vector_size(32)));
constexpr int kRowBlock = 6;  // 6 rows x 2 vectors = 12 of the 16 vector registers
constexpr int kPanelsPerBlock = 1;
#else
typedef float PanelVector __attribute__((vector_size(16)));
constexpr int kRowBlock = 3;  // 3 rows x 4 vectors = 12 of the 16 vector registers
constexpr int kPanelsPerBlock = 1;
#endif
constexpr int kVectorWidth = sizeof(PanelVector) / sizeof(float);
constexpr int kVectorsPerPanelRow = kPanelColumns / kVectorWidth;

struct PanelMatmul {
  const float* x;
  int64_t k;
  const float* packed;
  float* out;
  int64_t columns;
};

// Rows [row, row + Rows) times panels [panel, panel + Panels): the sums stay in registers over all of k.
template <int Rows, int Panels>
void PanelBlock(const PanelMatmul& m, int64_t row, int64_t panel) {
  constexpr int kVectors = Panels * kVectorsPerPanelRow;
  PanelVector sums[Rows][kVectors] = {};
  const float* x = m.x + row * m.k;
  const float* weights = m.packed + panel * m.k * kPanelColumns;
  for (int64_t position = 0; position < m.k; ++position) {
    PanelVector w[kVectors];
    for (int p = 0; p < Panels; ++p) {
      for (int v = 0; v < kVectorsPerPanelRow; ++v) {
        std::memcpy(&w[p * kVectorsPerPanelRow + v],
                    weights + (p * m.k + position) * kPanelColumns + v * kVectorWidth, sizeof(PanelVector));
      }
    }
    for (int r = 0; r < Rows; ++r) {
      const float value = x[r * m.k + position];
      for (int v = 0; v < kVectors; ++v) sums[r][v] += value * w[v];
    }
  }
  const int64_t first_column = panel * kPanelColumns;
  const int64_t width = std::min<int64_t>(Panels * kPanelColumns, m.columns - first_column);
  for (int r = 0; r < Rows; ++r) {
    std::memcpy(m.out + (row + r) * m.columns + first_column, sums[r], width * sizeof(float));
  }
}

using PanelBlockFunction = void (*)(const PanelMatmul&, int64_t, int64_t);

template <int Panels, std::size_t... Rows>
constexpr std::array<PanelBlockFunction, sizeof...(Rows)> PanelBlocks(std::index_sequence<Rows...>) {
  return {&PanelBlock<static_cast<int>(Rows) + 1, Panels>...};
}

// [panels in the block - 1][rows in the block - 1]
const std::array<PanelBlockFunction, kRowBlock> kPanelBlocks[2] = {
    PanelBlocks<1>(std::make_index_sequence<kRowBlock>()),
    PanelBlocks<kPanelsPerBlock>(std::make_index_sequence<kRowBlock>())};

}  // namespace

std::vector<paddle::Tensor> PackedMatmulForward(const paddle::Tensor& x_input, const paddle::Tensor& packed,
                                                int64_t columns) {
  const paddle::Tensor x = Dense(x_input);
  CheckFloat32OnCpu(x, "packed matmul input");
  CheckFloat32OnCpu(packed, "packed matmul weight");
  const std::vector<int64_t> panels_shape = packed.shape();
  const int64_t k = x.shape().back();
  const int64_t panels = (columns + kPanelColumns - 1) / kPanelColumns;
  PD_CHECK(panels_shape.size() == 3 && panels_shape[0] == panels && panels_shape[1] == k &&
               panels_shape[2] == kPanelColumns,
           "packed matmul weight must be [ceil(columns / 16), k, 16] for the input's k");
  std::vector<int64_t> shape = x.shape();
  shape.back() = columns;
  auto out = paddle::empty(shape, x.dtype(), x.place());
  const int64_t rows = x.numel() / k;
  const PanelMatmul m{x.data<float>(), k, packed.data<float>(), out.data<float>(), columns};
  const int64_t panel_blocks = (panels + kPanelsPerBlock - 1) / kPanelsPerBlock;
#pragma omp parallel for schedule(static) num_threads(ThreadsFor(rows * k * columns / 64))
  for (int64_t block = 0; block < panel_blocks; ++block) {
    const int64_t panel = block * kPanelsPerBlock;
    const int64_t panels_here = std::min<int64_t>(kPanelsPerBlock, panels - panel);
    for (int64_t row = 0; row < rows; row += kRowBlock) {
      const int64_t rows_here = std::min<int64_t>(kRowBlock, rows - row);
      kPanelBlocks[panels_here - 1][rows_here - 1](m, row, panel);
    }
  }
  return {out};
}

std::vector<std::vector<int64_t>> PackedMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                                    int64_t columns) {
  std::vector<int64_t> shape = x;
  shape.back() = columns;
  return {shape};
}

std::vector<paddle::DataType> PackedMatmulDtype(const paddle::DataType& x, const paddle::DataType&) { return {x}; }

PD_BUILD_OP(paddle_llm_packed_matmul)
    .Inputs({"X", "Packed"})
    .Outputs({"Out"})
    .Attrs({"columns: int64_t"})
    .SetKernelFn(PD_KERNEL(PackedMatmulForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PackedMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PackedMatmulDtype));

// ----- Token cross entropy: loss = logsumexp(logits) - logits[label], 0 where label == ignore_index -----
//
// logits [..., vocab], labels [...] int64; loss is [..., 1] like F.cross_entropy(reduction="none"). The
// log-sum-exp of each row is kept for the backward, which then needs no second pass to find the row's maximum.

std::vector<paddle::Tensor> TokenCrossEntropyForward(const paddle::Tensor& logits_input,
                                                     const paddle::Tensor& labels_input,
                                                     int64_t ignore_index) {
  const paddle::Tensor logits = Dense(logits_input);
  const paddle::Tensor labels = Dense(labels_input);
  CheckFloat32OnCpu(logits, "cross_entropy logits");
  PD_CHECK(labels.is_cpu() && labels.dtype() == paddle::DataType::INT64, "cross_entropy labels must be CPU int64");
  const int64_t vocab = logits.shape().back();
  const int64_t rows = logits.numel() / vocab;
  PD_CHECK(labels.numel() == rows, "cross_entropy needs one label per row of logits");
  std::vector<int64_t> loss_shape = LeadingShape(logits.shape());
  loss_shape.push_back(1);
  auto loss = paddle::empty(loss_shape, logits.dtype(), logits.place());
  auto log_sum_exp = paddle::empty({rows}, logits.dtype(), logits.place());
  const float* logit_data = logits.data<float>();
  const int64_t* label_data = labels.data<int64_t>();
  float* loss_data = loss.data<float>();
  float* lse_data = log_sum_exp.data<float>();
  int64_t bad_label = -1;
#pragma omp parallel for num_threads(ThreadsFor(logits.numel()))
  for (int64_t row = 0; row < rows; ++row) {
    const float* in = logit_data + row * vocab;
    float largest = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : largest)
    for (int64_t i = 0; i < vocab; ++i) largest = std::max(largest, in[i]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < vocab; ++i) total += std::exp(in[i] - largest);
    const float lse = largest + std::log(total);
    lse_data[row] = lse;
    const int64_t label = label_data[row];
    if (label == ignore_index) {
      loss_data[row] = 0.0f;
    } else if (label < 0 || label >= vocab) {
#pragma omp critical
      bad_label = label;
      loss_data[row] = 0.0f;
    } else {
      loss_data[row] = lse - in[label];
    }
  }
  PD_CHECK(bad_label == -1, "cross_entropy label ", bad_label, " is outside the vocabulary [0, ", vocab, ")");
  return {loss, log_sum_exp};
}

// grad_logits = g * (softmax(logits) - one_hot(label)), zero rows for ignored labels.
std::vector<paddle::Tensor> TokenCrossEntropyBackward(const paddle::Tensor& logits_input,
                                                      const paddle::Tensor& labels_input,
                                                      const paddle::Tensor& log_sum_exp_input,
                                                      const paddle::Tensor& grad_loss_input, int64_t ignore_index) {
  const paddle::Tensor logits = Dense(logits_input);
  const paddle::Tensor labels = Dense(labels_input);
  const paddle::Tensor log_sum_exp = Dense(log_sum_exp_input);
  const paddle::Tensor grad_loss = Dense(grad_loss_input);
  auto grad_logits = paddle::empty(logits.shape(), logits.dtype(), logits.place());
  const int64_t vocab = logits.shape().back();
  const int64_t rows = logits.numel() / vocab;
  const float* logit_data = logits.data<float>();
  const int64_t* label_data = labels.data<int64_t>();
  const float* lse_data = log_sum_exp.data<float>();
  const float* grad_data = grad_loss.data<float>();
  float* out_data = grad_logits.data<float>();
#pragma omp parallel for num_threads(ThreadsFor(logits.numel()))
  for (int64_t row = 0; row < rows; ++row) {
    const float* in = logit_data + row * vocab;
    float* out = out_data + row * vocab;
    const int64_t label = label_data[row];
    const float grad = label == ignore_index ? 0.0f : grad_data[row];
    const float lse = lse_data[row];
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) out[i] = grad * std::exp(in[i] - lse);
    if (label != ignore_index) out[label] -= grad;
  }
  return {grad_logits};
}

std::vector<std::vector<int64_t>> TokenCrossEntropyShape(const std::vector<int64_t>& logits,
                                                         const std::vector<int64_t>&) {
  std::vector<int64_t> loss_shape = LeadingShape(logits);
  loss_shape.push_back(1);
  int64_t rows = 1;
  for (int64_t size : LeadingShape(logits)) rows *= size;
  return {loss_shape, {rows}};
}

std::vector<paddle::DataType> TokenCrossEntropyDtype(const paddle::DataType& logits, const paddle::DataType&) {
  return {logits, logits};
}

PD_BUILD_OP(paddle_llm_token_cross_entropy)
    .Inputs({"Logits", "Labels"})
    .Outputs({"Loss", "LogSumExp"})
    .Attrs({"ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(TokenCrossEntropyForward))
    .SetInferShapeFn(PD_INFER_SHAPE(TokenCrossEntropyShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(TokenCrossEntropyDtype));

PD_BUILD_GRAD_OP(paddle_llm_token_cross_entropy)
    .Inputs({"Logits", "Labels", "LogSumExp", paddle::Grad("Loss")})
    .Outputs({paddle::Grad("Logits")})
    .Attrs({"ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(TokenCrossEntropyBackward));
