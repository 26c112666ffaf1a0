// Activation checkpointing (dist/src/ffi/checkpoint.rs): a layer computed
// without keeping its activations, and computed again by a Rust callback
// when backward reaches it. libtorch's C++ API has no torch.utils.checkpoint;
// this is its reentrant variant as a C++ autograd function, with the
// layer's parameters as explicit inputs so that their gradients leave
// through this node and are accumulated by the outer backward (gradient
// hooks then fire as without checkpointing).

#include "shim.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>
#include <utility>

#ifdef __GLIBC__
#include <malloc.h>
#endif

extern "C" {

// The Rust side's layer: computes `ctx`'s layer (`again`: 1 when backward
// recomputes it, 0 the first time) from `n` inputs, each a new
// `at::Tensor*` that the callee takes over, and stores its output as a new
// `at::Tensor*` in `*out`. On failure it returns non-zero and describes the
// failure through vlm_message_set(`message`, ...).
typedef int32_t (*vlm_recompute_fn)(
    void* ctx,
    int32_t again,
    at::Tensor** inputs,
    size_t n,
    at::Tensor** out,
    void* message);

// Frees `ctx` (the Rust closure).
typedef void (*vlm_release_fn)(void* ctx);

// Stores `len` bytes at `text` as the message of a failed callback.
void vlm_message_set(void* message, const char* text, size_t len) {
  static_cast<std::string*>(message)->assign(text, len);
}

} // extern "C"

namespace {

// A generator and the state it had when a layer first ran.
struct RngState {
  at::Generator gen;
  at::Tensor state;
};

// The states of the generators a layer's random draws (dropout) use: the
// CPU's, and the default generator of each CUDA device among its inputs.
std::vector<RngState> capture_rng(const std::vector<at::Tensor>& inputs) {
  std::vector<at::Generator> gens{at::detail::getDefaultCPUGenerator()};
  std::vector<c10::DeviceIndex> seen;
  for (const auto& t : inputs) {
    if (t.defined() && t.is_cuda()) {
      c10::DeviceIndex i = t.device().index();
      if (std::find(seen.begin(), seen.end(), i) == seen.end()) {
        seen.push_back(i);
        gens.push_back(at::globalContext().defaultGenerator(t.device()));
      }
    }
  }
  std::vector<RngState> out;
  for (auto& g : gens) {
    std::lock_guard<std::mutex> lock(g.mutex());
    out.push_back(RngState{g, g.get_state()});
  }
  return out;
}

// While alive, the generators are back in their captured states; their
// states from before are restored after, so the recomputation draws the
// first run's masks and leaves the run's own random stream as it was.
class Replay {
 public:
  explicit Replay(const std::vector<RngState>& saved) {
    for (const auto& s : saved) {
      at::Generator g = s.gen;
      std::lock_guard<std::mutex> lock(g.mutex());
      previous_.push_back(RngState{g, g.get_state()});
      g.set_state(s.state);
    }
  }
  ~Replay() {
    for (auto& p : previous_) {
      std::lock_guard<std::mutex> lock(p.gen.mutex());
      p.gen.set_state(p.state);
    }
  }
  Replay(const Replay&) = delete;
  Replay& operator=(const Replay&) = delete;

 private:
  std::vector<RngState> previous_;
};

// One checkpointed layer call: the Rust closure, the parameters it reads,
// and the generator states of its first run. The closure is released when
// the autograd node that holds this goes (or at once, when no node is made).
struct Layer : torch::CustomClassHolder {
  Layer(void* c, vlm_recompute_fn r, vlm_release_fn f)
      : ctx(c), run(r), release(f) {}
  ~Layer() override {
    release(ctx);
  }
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  at::Tensor call(const std::vector<at::Tensor>& inputs, bool again) const {
    std::vector<at::Tensor*> handles;
    handles.reserve(inputs.size());
    for (const auto& t : inputs) {
      handles.push_back(new at::Tensor(t));
    }
    at::Tensor* out = nullptr;
    std::string message;
    // The callee owns the handles from here on, whatever it returns.
    int32_t code = run(ctx, again ? 1 : 0, handles.data(), handles.size(), &out, &message);
    TORCH_CHECK(
        code == VLM_OK && out != nullptr,
        "a checkpointed layer failed: ",
        message.empty() ? std::string("no message") : message);
    at::Tensor result = std::move(*out);
    delete out;
    return result;
  }

  void* ctx;
  vlm_recompute_fn run;
  vlm_release_fn release;
  std::vector<at::Tensor> params;
  std::vector<RngState> rng;
};

// Host memory on the CPU (glibc). A checkpointed step frees the layers'
// activations right after computing them and again after recomputing them,
// between the gradients that backward allocates and keeps. glibc serves
// buffers below its mmap threshold from its heap, and raises that threshold
// (up to 32 MiB) each time it frees a larger mapped buffer, so a layer's
// activations soon come from the heap, which then fragments around the
// gradients: the process keeps resident about what checkpointing saved
// (bench/MEMORY.md). So the first checkpointed layer on the CPU fixes the
// threshold at 4 MiB (process-wide: buffers of 4 MiB and more are mapped
// and unmapped, as glibc does by default down to 128 KiB until its first
// large free), and after each recomputed layer malloc_trim hands the whole
// free pages of the heap back. It costs system time (fresh pages are
// faulted in again) and takes the activation memory of a step down by more
// than 90% instead of about 25% (bench/MEMORY.md).
void fix_mmap_threshold(const std::vector<at::Tensor>& inputs) {
#ifdef __GLIBC__
  if (!inputs.empty() && inputs[0].defined() && inputs[0].is_cpu()) {
    static std::once_flag once;
    std::call_once(once, [] { mallopt(M_MMAP_THRESHOLD, 4 << 20); });
  }
#endif
}

void release_host_memory(const torch::autograd::variable_list& saved) {
#ifdef __GLIBC__
  if (!saved.empty() && saved[0].defined() && saved[0].is_cpu()) {
    malloc_trim(0);
  }
#endif
}

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  // `inputs` are saved for backward; the output is computed without
  // gradient tracking (Function::apply turns it off around forward).
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const c10::intrusive_ptr<Layer>& layer,
      at::TensorList inputs,
      at::TensorList params) {
    std::vector<at::Tensor> in = inputs.vec();
    fix_mmap_threshold(in);
    layer->rng = capture_rng(in);
    layer->params = params.vec();
    at::Tensor out = layer->call(in, false);
    ctx->saved_data["layer"] = c10::IValue::make_capsule(
        c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(layer));
    ctx->save_for_backward(in);
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    auto layer = c10::static_intrusive_pointer_cast<Layer>(
        ctx->saved_data["layer"].toCapsule());
    torch::autograd::variable_list saved = ctx->get_saved_variables();
    std::vector<at::Tensor> inputs;
    inputs.reserve(saved.size());
    for (const auto& t : saved) {
      at::Tensor d = t.detach();
      if (t.requires_grad()) {
        d.requires_grad_(true);
      }
      inputs.push_back(std::move(d));
    }
    at::Tensor out;
    {
      Replay replay(layer->rng);
      at::AutoGradMode on(true);
      out = layer->call(inputs, true);
    }
    // The gradients this node returns: none for the layer handle, then one
    // per input, then one per parameter.
    const size_t n = inputs.size();
    torch::autograd::variable_list result(1 + n + layer->params.size());
    std::vector<at::Tensor> targets;
    std::vector<size_t> slots;
    for (size_t i = 0; i < n + layer->params.size(); ++i) {
      const at::Tensor& t = i < n ? inputs[i] : layer->params[i - n];
      if (t.defined() && t.requires_grad()) {
        targets.push_back(t);
        slots.push_back(1 + i);
      }
    }
    if (!targets.empty() && out.requires_grad()) {
      // Captured, not accumulated: the parameters' gradients go back to the
      // outer backward through this node's edges.
      auto g = torch::autograd::grad(
          {out},
          targets,
          {grads[0]},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      for (size_t k = 0; k < g.size(); ++k) {
        result[slots[k]] = g[k];
      }
    }
    // The recomputed activations are gone with the graph `grad` consumed.
    out.reset();
    inputs.clear();
    release_host_memory(saved);
    return result;
  }
};

std::vector<at::Tensor> tensors_of(at::Tensor** ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ptrs[i]);
  }
  return out;
}

} // namespace

extern "C" {

// `run(inputs)` as a checkpointed layer reading `params` (see Checkpoint).
// Takes over `ctx` in every case (released through `release`). Where grad
// mode is off or no input or parameter requires grad, it only calls `run`.
// `*out` receives a new tensor.
int32_t vlm_checkpoint(
    at::Tensor** inputs,
    size_t n_inputs,
    at::Tensor** params,
    size_t n_params,
    void* ctx,
    vlm_recompute_fn run,
    vlm_release_fn release,
    at::Tensor** out,
    char** err) {
  c10::intrusive_ptr<Layer> layer;
  int32_t made = guarded(err, [&] {
    layer = c10::make_intrusive<Layer>(ctx, run, release);
    return VLM_OK;
  });
  if (made != VLM_OK) {
    release(ctx);
    return made;
  }
  return guarded(err, [&] {
    std::vector<at::Tensor> in = tensors_of(inputs, n_inputs);
    std::vector<at::Tensor> ps = tensors_of(params, n_params);
    bool needs_grad = false;
    for (const auto& t : in) {
      needs_grad |= t.defined() && t.requires_grad();
    }
    for (const auto& t : ps) {
      needs_grad |= t.defined() && t.requires_grad();
    }
    at::Tensor result;
    if (at::GradMode::is_enabled() && needs_grad) {
      result = Checkpoint::apply(
          layer, at::TensorList(in), at::TensorList(ps));
    } else {
      result = layer->call(in, false);
    }
    *out = new at::Tensor(std::move(result));
    return VLM_OK;
  });
}

} // extern "C"
