// Collectives inside autograd: the differentiable all-gather, and setting a
// parameter's gradient (dist/src/ffi/autograd.rs).

#include "shim.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

namespace {

// torch.distributed.nn.functional.all_gather as a C++ autograd function.
// Forward: every rank's `input` (equal shapes) concatenated along dim 0, in
// rank order. Backward: the gradient of the whole gathered tensor is summed
// over ranks (every rank's loss depends on every rank's rows) and this
// rank's rows of the sum are its input's gradient. Both directions wait for
// their collective: backward must hand a finished gradient to the engine.
// (PyTorch's own version reduce-scatters in backward, moving 1/world of the
// data; Gloo has no reduce-scatter, and these tensors are small.)
struct GatherWithGrad : public torch::autograd::Function<GatherWithGrad> {
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& input,
      const c10::intrusive_ptr<PgState>& pg) {
    at::Tensor in = input.contiguous();
    TORCH_CHECK(in.dim() >= 1, "all_gather_with_grad needs a tensor of 1+ dims");
    auto sizes = in.sizes().vec();
    sizes[0] *= pg->size;
    at::Tensor out = at::empty(sizes, in.options());
    auto launched = pg->start(
        VLM_OP_ALLGATHER, [&] { return pg->backend->_allgather_base(out, in); });
    wait_or_fail(*pg, launched, pg->timeout);
    ctx->saved_data["pg"] = c10::IValue::make_capsule(
        c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(pg));
    ctx->saved_data["rows"] = in.size(0);
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    auto pg = c10::static_intrusive_pointer_cast<PgState>(
        ctx->saved_data["pg"].toCapsule());
    int64_t rows = ctx->saved_data["rows"].toInt();
    // A private contiguous copy: the all-reduce writes in place, and the
    // incoming gradient may be shared with other nodes.
    at::Tensor g = grads[0].contiguous().clone();
    auto launched = start_allreduce_sum(*pg, g);
    wait_or_fail(*pg, launched, pg->timeout);
    return {g.narrow(0, pg->rank * rows, rows), at::Tensor()};
  }
};

} // namespace

extern "C" {

// Every rank's `input` concatenated along dim 0, differentiable (see
// GatherWithGrad). Waits for the gather; `*out` receives a new tensor.
int32_t vlm_pg_allgather_with_grad(
    vlm_pg* pg,
    at::Tensor* input,
    at::Tensor** out,
    char** err) {
  return guarded(err, [&] {
    at::Tensor result = GatherWithGrad::apply(*input, pg->state);
    *out = new at::Tensor(std::move(result));
    return VLM_OK;
  });
}

// Sets `param.grad` to `grad` (no copy), defining it where it was undefined.
int32_t vlm_tensor_set_grad(at::Tensor* param, at::Tensor* grad, char** err) {
  return guarded(err, [&] {
    param->mutable_grad() = *grad;
    return VLM_OK;
  });
}

} // extern "C"
