// One decode step of the steering op in one native call, for fp32 CPU tensors (see native.py):
//   h[b] <- h[b] - sum_j beta[b,j] (h[b].r_j) r_j + bias[b]      (bias[b] = sum_k alpha[b,k] v_k, precomputed)
// h is [B, 1, d] contiguous; projections use the original h; fp32 accumulation.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <vector>

namespace {

// A plain, dense, contiguous fp32 CPU tensor whose memory this code may read or write directly: no subclass
// or wrapper (Python, functorch, functionalization, nested), no lazy bits (zero, negative, conjugate), no
// forward-mode tangent. Key-set checks first: they are cheap and never call back into Python.
bool plain(const torch::Tensor& t) {
  if (!t.defined()) return false;
  const c10::DispatchKeySet ks = t.key_set();
  if (ks.has_any(c10::python_ks) || ks.has(c10::DispatchKey::FuncTorchBatched) ||
      ks.has(c10::DispatchKey::Functionalize) || ks.has(c10::DispatchKey::FuncTorchGradWrapper))
    return false;
  return !t.is_nested() && t.device().type() == c10::kCPU && t.layout() == c10::kStrided &&
         t.scalar_type() == at::kFloat && t.is_contiguous() && t.has_storage() && !t._is_zerotensor() &&
         !t.is_neg() && !t.is_conj() && !t._fw_grad(/*level=*/0).defined();
}

}  // namespace

// Returns false, changing nothing, when h (or an operand) is not what this path handles; the caller then
// takes the ATen path. Refused: anything but plain [B, 1, d] h with matching R [J, d], beta [B, J] and
// bias [B, 1, d] (or None); h that autograd tracks; an inference tensor outside inference mode (ATen refuses
// in-place updates there); any active TorchDispatchMode (make_fx, FakeTensorMode, ...) or torch.jit.trace.
bool decode_(torch::Tensor h, const torch::Tensor& R, const torch::Tensor& beta,
             const c10::optional<torch::Tensor>& bias) {
  // a dispatch mode (make_fx, FakeTensorMode) or torch.jit.trace would not record this write
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || torch::jit::tracer::isTracing()) return false;
  if (!plain(h) || h.dim() != 3 || h.size(1) != 1) return false;
  if (h.requires_grad() && at::GradMode::is_enabled()) return false;
  if (h.is_inference() && !c10::InferenceMode::is_enabled()) return false;
  const int64_t B = h.size(0), d = h.size(2);
  if (!plain(R) || R.dim() != 2 || R.size(1) != d) return false;
  const int64_t J = R.size(0);
  if (!plain(beta) || beta.dim() != 2 || beta.size(0) != B || beta.size(1) != J) return false;
  const float* cp = nullptr;
  if (bias.has_value()) {
    const torch::Tensor& c = *bias;
    if (!plain(c) || c.dim() != 3 || c.size(0) != B || c.size(1) != 1 || c.size(2) != d) return false;
    cp = c.data_ptr<float>();
  }
  float* hp = h.data_ptr<float>();
  const float* rp = R.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  // Small batches (every decode step at B<=~16) run inline; big ones split rows over torch's threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, d * (J + 1)));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    float small[16];                               // projections of one row; the heap only for J > 16
    std::vector<float> large(J > 16 ? J : 0);
    float* s = J > 16 ? large.data() : small;
    for (int64_t b = b0; b < b1; ++b) {
      float* x = hp + b * d;
      for (int64_t j = 0; j < J; ++j) {          // every projection of the original h first
        const float* r = rp + j * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < d; ++i) acc += x[i] * r[i];
        s[j] = -bp[b * J + j] * acc;
      }
      for (int64_t j = 0; j < J; ++j) {          // x - beta*(x.r)*r, one direction at a time
        const float* r = rp + j * d;
        const float sj = s[j];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) x[i] += sj * r[i];
      }
      if (cp != nullptr) {                       // + sum_k alpha_k v_k
        const float* c = cp + b * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) x[i] += c[i];
      }
    }
  });
  if (!h.is_inference()) h.unsafeGetTensorImpl()->bump_version();  // as an ATen in-place op would
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_", &decode_, "steer's fused decode step (fp32 CPU), in place; False if not applicable");
}
