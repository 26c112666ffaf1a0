// The bucketed gradient reducer, with its gradient hooks
// (dist/src/ffi/reducer.rs).

#include "shim.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <unordered_set>

namespace {

// The dtype of a bucket's flat buffer for a parameter: fp32 for every
// floating type up to 32 bits (bf16 and fp16 gradients are reduced in fp32),
// the parameter's own type otherwise (fp64 stays fp64).
at::ScalarType buffer_type(const at::Tensor& p) {
  if (at::isFloatingType(p.scalar_type()) && p.element_size() <= 4) {
    return at::kFloat;
  }
  return p.scalar_type();
}

struct Reducer;

// Registered on each parameter by Reducer::attach: runs after autograd has
// accumulated the parameter's gradient of this backward into `.grad`.
struct ReducerHook : torch::autograd::PostAccumulateGradHook {
  ReducerHook(std::weak_ptr<Reducer> r, size_t i)
      : reducer(std::move(r)), index(i) {}
  void operator()(const torch::autograd::Variable& param) override;
  std::weak_ptr<Reducer> reducer;
  size_t index;
};

struct Bucket {
  std::vector<size_t> params; // indices into Reducer::params
  std::vector<int64_t> offsets; // each one's first element in `buffer`
  int64_t numel = 0; // gradient elements; the flags follow them
  // Flat, allocated on first use and reused: the gradients (`numel`
  // elements), then one flag per parameter, 1 where this rank has a
  // gradient for it and 0 where not. Summed over ranks, a flag says how
  // many ranks had one (DDP's "global unused parameters" map, reduced with
  // the gradients instead of as an extra collective).
  at::Tensor buffer;
  size_t pending = 0; // gradients not yet copied in this step
  Launched launched; // this step's all-reduce, once launched

  int64_t flag_offset() const {
    return numel;
  }
  int64_t buffer_numel() const {
    return numel + static_cast<int64_t>(params.size());
  }
};

// Bucketed gradient all-reduce (the part of DDP's c10d::Reducer vlmatch
// needs). Buckets are given by the caller, in launch order. Without hooks,
// finish() flattens, launches, waits, averages and writes back every bucket.
// With hooks attached, a parameter's gradient is copied into its bucket as
// soon as autograd has accumulated it, and a bucket is launched once all its
// parameters have arrived and every earlier bucket has been launched (so all
// ranks launch in the same order whatever their timing); finish() then only
// launches the buckets whose parameters got no gradient (no hook fires for
// those) and waits.
//
// Unused parameters, as DDP treats them: a parameter without a gradient on
// this rank contributes zeros and a 0 flag. After the reduction, where no
// rank had a gradient its `.grad` stays undefined (so the optimizer skips it,
// as it would in one process); where some had one, the missing ones count as
// zeros and the average is defined on every rank.
struct Reducer : std::enable_shared_from_this<Reducer> {
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<size_t> slot_of;
  std::vector<char> arrived;
  std::vector<Bucket> buckets;
  std::mutex mu;
  c10::intrusive_ptr<PgState> attached; // the group of the hooks, if any
  bool sync = true;
  size_t next_launch = 0;
  std::string error; // the first failure inside a hook
  int32_t error_op = VLM_OP_NONE;
  // Buckets the hooks had launched when the last finish() began.
  size_t last_overlapped = 0;

  void copy_in(size_t i) {
    Bucket& b = buckets[bucket_of[i]];
    const at::Tensor& p = params[i];
    if (!b.buffer.defined()) {
      b.buffer = at::empty(
          {b.buffer_numel()},
          p.options().dtype(buffer_type(p)).requires_grad(false));
    }
    at::Tensor slot = b.buffer.narrow(0, b.offsets[slot_of[i]], p.numel());
    at::Tensor flag = b.buffer.narrow(
        0, b.flag_offset() + static_cast<int64_t>(slot_of[i]), 1);
    at::Tensor g = p.grad();
    if (g.defined()) {
      TORCH_CHECK(
          !g.is_sparse(), "parameter ", i, " has a sparse gradient");
      slot.copy_(g.reshape({-1}));
      flag.fill_(1);
    } else {
      slot.zero_();
      flag.zero_();
    }
  }

  void launch(PgState& pg, Bucket& b) {
    b.launched = start_allreduce_sum(pg, b.buffer);
  }

  // Launches, in order, the buckets whose gradients have all arrived.
  void launch_ready(PgState& pg) {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      launch(pg, buckets[next_launch]);
      ++next_launch;
    }
  }

  void on_grad(size_t i) {
    std::lock_guard<std::mutex> guard(mu);
    if (!sync || !attached || !error.empty()) {
      return;
    }
    try {
      at::NoGradGuard no_grad;
      Bucket& b = buckets[bucket_of[i]];
      if (arrived[i]) {
        // A second backward in the same step, before finish().
        TORCH_CHECK(
            !b.launched.work,
            "parameter ",
            i,
            " received a gradient after its bucket was already being "
            "reduced (two backward passes before reduce: turn the sync "
            "off for the micro-steps of gradient accumulation)");
        copy_in(i);
        return;
      }
      copy_in(i);
      arrived[i] = 1;
      --b.pending;
      launch_ready(*attached);
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
      error_op = VLM_OP_ALLREDUCE;
    } catch (const std::exception& e) {
      error = e.what();
      error_op = VLM_OP_ALLREDUCE;
    }
  }

  void reset() {
    std::fill(arrived.begin(), arrived.end(), 0);
    for (Bucket& b : buckets) {
      b.pending = b.params.size();
      b.launched = Launched{};
    }
    next_launch = 0;
    error.clear();
    error_op = VLM_OP_NONE;
  }

  // Completes the step's reduction on `pg`: launches what is not launched
  // yet, waits for all, divides by the world size and writes the averages
  // back into every parameter's `.grad` (defining missing ones).
  void finish(const c10::intrusive_ptr<PgState>& pg, std::chrono::milliseconds timeout) {
    std::lock_guard<std::mutex> guard(mu);
    at::NoGradGuard no_grad;
    struct Reset {
      Reducer* r;
      ~Reset() {
        r->reset();
      }
    } reset_at_exit{this};
    TORCH_CHECK(
        !attached || attached.get() == pg.get(),
        "the reducer's hooks are attached to another process group");
    if (!error.empty()) {
      int32_t none = VLM_OP_NONE;
      pg->failed_op.compare_exchange_strong(none, error_op);
      TORCH_CHECK(false, "during backward: ", error);
    }
    last_overlapped = next_launch;
    for (; next_launch < buckets.size(); ++next_launch) {
      Bucket& b = buckets[next_launch];
      for (size_t i : b.params) {
        if (!arrived[i]) {
          copy_in(i);
        }
      }
      launch(*pg, b);
    }
    for (Bucket& b : buckets) {
      wait_or_fail(*pg, b.launched, timeout);
    }
    for (Bucket& b : buckets) {
      // How many ranks had a gradient for each parameter; read (a device
      // sync on CUDA) only for buckets where this rank lacks one.
      at::Tensor counts;
      for (size_t i : b.params) {
        if (!params[i].grad().defined()) {
          counts = b.buffer.narrow(0, b.flag_offset(), b.params.size())
                       .to(at::kCPU, at::kDouble);
          break;
        }
      }
      b.buffer.narrow(0, 0, b.numel).div_(pg->size);
      for (size_t k = 0; k < b.params.size(); ++k) {
        const at::Tensor& p = params[b.params[k]];
        at::Tensor avg = b.buffer.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
        at::Tensor& g = p.mutable_grad();
        if (g.defined()) {
          g.copy_(avg);
        } else if (counts.data_ptr<double>()[k] > 0.5) {
          // Another rank used it: this rank's zeros are in the average.
          g = avg.to(p.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
        }
        // Else no rank used it: the gradient stays undefined everywhere.
      }
    }
  }

  void attach(const c10::intrusive_ptr<PgState>& pg) {
    std::lock_guard<std::mutex> guard(mu);
    TORCH_CHECK(!attached, "the reducer's hooks are already attached");
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      TORCH_CHECK(
          p.is_leaf() && p.requires_grad(),
          "parameter ",
          i,
          " is not a leaf tensor that requires grad; gradient hooks need one");
      TORCH_CHECK(
          !torch::autograd::impl::post_acc_grad_hooks(p),
          "parameter ",
          i,
          " already has a post-accumulate-grad hook");
    }
    for (size_t i = 0; i < params.size(); ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(
          params[i], std::make_unique<ReducerHook>(weak_from_this(), i));
    }
    attached = pg;
  }

  void detach() {
    std::lock_guard<std::mutex> guard(mu);
    if (!attached) {
      return;
    }
    for (const at::Tensor& p : params) {
      auto& hook = torch::autograd::impl::post_acc_grad_hooks(p);
      auto* ours = dynamic_cast<ReducerHook*>(hook.get());
      if (ours != nullptr && ours->reducer.lock().get() == this) {
        hook.reset();
      }
    }
    attached.reset();
    reset();
  }
};

void ReducerHook::operator()(const torch::autograd::Variable& /*param*/) {
  if (auto r = reducer.lock()) {
    r->on_grad(index);
  }
}

} // namespace

struct vlm_reducer {
  std::shared_ptr<Reducer> reducer;
};

extern "C" {

// A reducer over `n` parameters; `bucket_of[i]` is parameter i's bucket,
// buckets numbered 0.. in launch order, each listing its parameters in the
// order given. Every bucket's parameters must share device and buffer type.
int32_t vlm_reducer_new(
    at::Tensor* const* params,
    const size_t* bucket_of,
    size_t n,
    vlm_reducer** out,
    char** err) {
  return guarded(err, [&] {
    auto r = std::make_shared<Reducer>();
    size_t nb = 0;
    for (size_t i = 0; i < n; ++i) {
      nb = std::max(nb, bucket_of[i] + 1);
    }
    r->buckets.resize(nb);
    std::unordered_set<const void*> seen;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = *params[i];
      TORCH_CHECK(p.defined(), "parameter ", i, " is undefined");
      TORCH_CHECK(
          seen.insert(p.unsafeGetTensorImpl()).second,
          "parameter ",
          i,
          " is listed twice");
      Bucket& b = r->buckets[bucket_of[i]];
      if (!b.params.empty()) {
        const at::Tensor& first = r->params[b.params[0]];
        TORCH_CHECK(
            first.device() == p.device() && buffer_type(first) == buffer_type(p),
            "parameter ",
            i,
            " differs in device or gradient type from the rest of its bucket");
      }
      r->params.push_back(p);
      r->bucket_of.push_back(bucket_of[i]);
      r->slot_of.push_back(b.params.size());
      b.params.push_back(i);
      b.offsets.push_back(b.numel);
      b.numel += p.numel();
    }
    for (size_t k = 0; k < nb; ++k) {
      TORCH_CHECK(!r->buckets[k].params.empty(), "bucket ", k, " is empty");
    }
    r->arrived.assign(n, 0);
    r->reset();
    *out = new vlm_reducer{std::move(r)};
    return VLM_OK;
  });
}

void vlm_reducer_free(vlm_reducer* r) {
  if (r != nullptr) {
    try {
      r->reducer->detach();
    } catch (...) {
    }
    delete r;
  }
}

// Registers the gradient hooks: later backward passes launch each bucket's
// all-reduce on `pg` as soon as its gradients are complete.
int32_t vlm_reducer_attach(vlm_reducer* r, vlm_pg* pg, char** err) {
  return guarded(err, [&] {
    r->reducer->attach(pg->state);
    return VLM_OK;
  });
}

void vlm_reducer_detach(vlm_reducer* r) {
  try {
    r->reducer->detach();
  } catch (...) {
  }
}

// With the hooks attached: whether they copy and launch (1) or let the
// gradients accumulate untouched (0, the micro-steps of accumulation).
void vlm_reducer_set_sync(vlm_reducer* r, int32_t sync) {
  std::lock_guard<std::mutex> guard(r->reducer->mu);
  r->reducer->sync = sync != 0;
}

size_t vlm_reducer_last_overlapped(vlm_reducer* r) {
  std::lock_guard<std::mutex> guard(r->reducer->mu);
  return r->reducer->last_overlapped;
}

// After backward: completes the step's all-reduce on `pg` and writes every
// parameter's averaged gradient back. A bucket still pending after
// `timeout_ms` fails with a message saying "timed out".
int32_t vlm_reducer_finish(
    vlm_reducer* r,
    vlm_pg* pg,
    int64_t timeout_ms,
    char** err) {
  return guarded(err, [&] {
    r->reducer->finish(pg->state, std::chrono::milliseconds(timeout_ms));
    return VLM_OK;
  });
}

} // extern "C"
