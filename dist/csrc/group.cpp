// Process groups: Gloo (declared by hand, see gloo_decl.h) and NCCL over a
// store, their collectives and the work they return (dist/src/ffi/group.rs).
//
// ProcessGroupNCCL.hpp compiles as is, given nccl.h and the CUDA headers that
// PyPI ships (build.rs finds them and defines VLMATCH_WITH_NCCL and
// USE_C10D_NCCL). Without them the NCCL entry point returns an error.

#include "shim.h"

#include "gloo_decl.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#ifdef VLMATCH_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

std::vector<at::Tensor> tensor_list(at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    // A shallow copy: shares storage with the caller's tensor, so in-place
    // collectives write into it.
    out.push_back(*tensors[i]);
  }
  return out;
}

// Starts collective `op` on `pg` (`launch(backend)` issues it, under the
// launch lock) and hands its work to `out`.
template <typename F>
int32_t start_work(vlm_pg* pg, int32_t op, vlm_work** out, F&& launch) {
  PgState& state = *pg->state;
  Launched launched =
      state.start(op, [&] { return launch(*state.backend); });
  *out = new vlm_work{
      std::move(launched.work), state.activity, launched.seq, launched.op};
  return VLM_OK;
}

vlm_pg* new_pg(
    c10::intrusive_ptr<c10d::Backend> backend,
    int64_t timeout_ms,
    int rank,
    int size) {
  auto state = c10::make_intrusive<PgState>();
  state->backend = std::move(backend);
  state->timeout = std::chrono::milliseconds(timeout_ms);
  state->rank = rank;
  state->size = size;
  return new vlm_pg{std::move(state)};
}

// A process group of type `PG`, built with `opts`, over `prefix`-scoped
// keys of the store `s` (so several groups can share one store).
template <typename PG, typename Options>
vlm_pg* new_prefixed_pg(
    vlm_store* s,
    const char* prefix,
    int32_t rank,
    int32_t size,
    int64_t timeout_ms,
    Options opts) {
  auto store =
      c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
  auto pg = c10::make_intrusive<PG>(
      c10::static_intrusive_pointer_cast<c10d::Store>(store),
      rank,
      size,
      std::move(opts));
  return new_pg(
      c10::static_intrusive_pointer_cast<c10d::Backend>(std::move(pg)),
      timeout_ms,
      rank,
      size);
}

} // namespace

void wait_or_fail(
    PgState& pg,
    const Launched& launched,
    std::chrono::milliseconds timeout) {
  const c10::intrusive_ptr<c10d::Work>& work = launched.work;
  int32_t op = launched.op;
  WaitMark mark(*pg.activity, launched.seq, op);
  try {
    work->wait(timeout);
    mark.completed();
  } catch (...) {
    int32_t none = VLM_OP_NONE;
    pg.failed_op.compare_exchange_strong(none, op);
    bool completed = true;
    try {
      completed = work->isCompleted();
    } catch (...) {
    }
    if (!completed) {
      TORCH_CHECK(
          false,
          "timed out after ",
          timeout.count(),
          " ms waiting for the collective (rank ",
          pg.rank,
          " of ",
          pg.size,
          ")");
    }
    throw;
  }
}

Launched start_allreduce_sum(PgState& pg, const at::Tensor& t) {
  return pg.start(VLM_OP_ALLREDUCE, [&] {
    std::vector<at::Tensor> list{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return pg.backend->allreduce(list, opts);
  });
}

extern "C" {

int32_t vlm_has_nccl(void) {
#ifdef VLMATCH_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// A Gloo process group over `prefix`-scoped keys of the store.
int32_t vlm_pg_gloo_new(
    vlm_store* s,
    const char* prefix,
    int32_t rank,
    int32_t size,
    int64_t timeout_ms,
    vlm_pg** out,
    char** err) {
  return guarded(err, [&] {
    auto opts = c10d::ProcessGroupGloo::Options::create_default(
        std::chrono::milliseconds(timeout_ms));
    *out = new_prefixed_pg<c10d::ProcessGroupGloo>(
        s, prefix, rank, size, timeout_ms, std::move(opts));
    return VLM_OK;
  });
}

int32_t vlm_pg_nccl_new(
    vlm_store* s,
    const char* prefix,
    int32_t rank,
    int32_t size,
    int64_t timeout_ms,
    vlm_pg** out,
    char** err) {
#ifdef VLMATCH_WITH_NCCL
  return guarded(err, [&] {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    *out = new_prefixed_pg<c10d::ProcessGroupNCCL>(
        s, prefix, rank, size, timeout_ms, std::move(opts));
    return VLM_OK;
  });
#else
  (void)s;
  (void)prefix;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  (void)out;
  if (err != nullptr) {
    *err = copy_string(
        "this build has no NCCL backend: nccl.h and the CUDA headers were "
        "not found when vlmatch-dist was compiled");
  }
  return VLM_ERROR;
#endif
}

void vlm_pg_free(vlm_pg* pg) {
  delete pg;
}

// Releases the handle without destroying the backend. Used after a
// collective failed or timed out: the backend's destructor joins its worker
// threads, which may still be blocked in the failed operation.
void vlm_pg_leak(vlm_pg* pg) {
  if (pg != nullptr) {
    (void)pg->state.release();
    delete pg;
  }
}

// In-place SUM all-reduce of each of `n` tensors (any shapes; one dtype and
// device). c10d's `allreduce` with several tensors would sum them into one
// another (the list is meant for several devices of one rank), so more than
// one tensor goes through `allreduce_coalesced`, which reduces each
// separately in one operation.
int32_t vlm_pg_allreduce_sum(
    vlm_pg* pg,
    at::Tensor* const* tensors,
    size_t n,
    vlm_work** out,
    char** err) {
  return guarded(err, [&] {
    auto list = tensor_list(tensors, n);
    if (list.size() == 1) {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      return start_work(pg, VLM_OP_ALLREDUCE, out, [&](c10d::Backend& b) {
        return b.allreduce(list, opts);
      });
    }
    c10d::AllreduceCoalescedOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return start_work(pg, VLM_OP_ALLREDUCE, out, [&](c10d::Backend& b) {
      return b.allreduce_coalesced(list, opts);
    });
  });
}

// Gathers every rank's `input` into `output`, whose first dimension is
// world_size times the input's, in rank order.
int32_t vlm_pg_allgather_base(
    vlm_pg* pg,
    at::Tensor* output,
    at::Tensor* input,
    vlm_work** out,
    char** err) {
  return guarded(err, [&] {
    at::Tensor o = *output;
    at::Tensor i = *input;
    return start_work(pg, VLM_OP_ALLGATHER, out, [&](c10d::Backend& b) {
      return b._allgather_base(o, i);
    });
  });
}

// SUM reduce-scatter: `input` holds world_size equal parts along dim 0
// (part r for rank r); every rank's inputs are summed and this rank's part of
// the sum lands in `output` (the size of one part). `_reduce_scatter_base` is
// NCCL's ncclReduceScatter, each rank receiving only its part. libtorch
// 2.11's Gloo has no reduce-scatter of its own: its `_reduce_scatter_base`
// clones the input, all-reduces the clone and copies this rank's part when
// the work is waited on, so on Gloo it costs an all-reduce of the whole
// input, and the work reports completion only through `wait`.
int32_t vlm_pg_reduce_scatter_sum(
    vlm_pg* pg,
    at::Tensor* output,
    at::Tensor* input,
    vlm_work** out,
    char** err) {
  return guarded(err, [&] {
    at::Tensor o = *output;
    at::Tensor i = *input;
    TORCH_CHECK(
        o.is_contiguous() && i.is_contiguous(),
        "reduce_scatter needs contiguous tensors");
    TORCH_CHECK(
        o.scalar_type() == i.scalar_type() && o.device() == i.device(),
        "reduce_scatter's input and output differ in dtype or device");
    TORCH_CHECK(
        i.dim() >= 1 && o.dim() == i.dim() &&
            i.size(0) == o.size(0) * pg->state->size &&
            i.numel() == o.numel() * pg->state->size,
        "reduce_scatter's input must be world_size (",
        pg->state->size,
        ") times its output along dim 0, got input ",
        i.sizes(),
        " and output ",
        o.sizes());
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return start_work(pg, VLM_OP_REDUCESCATTER, out, [&](c10d::Backend& b) {
      return b._reduce_scatter_base(o, i, opts);
    });
  });
}

// In-place broadcast of `tensor` from `root`.
int32_t vlm_pg_broadcast(
    vlm_pg* pg,
    at::Tensor* tensor,
    int64_t root,
    vlm_work** out,
    char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> list{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    return start_work(pg, VLM_OP_BROADCAST, out, [&](c10d::Backend& b) {
      return b.broadcast(list, opts);
    });
  });
}

int32_t vlm_pg_barrier(vlm_pg* pg, vlm_work** out, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions opts;
    return start_work(pg, VLM_OP_BARRIER, out, [&](c10d::Backend& b) {
      return b.barrier(opts);
    });
  });
}

// ---------------------------------------------------------------------------
// Work
// ---------------------------------------------------------------------------

// Waits up to `timeout_ms` for the work. VLM_TIMEOUT if it has not completed
// by then (it stays in flight); VLM_ERROR with the backend's message if it
// failed.
int32_t vlm_work_wait(vlm_work* w, int64_t timeout_ms, char** err) {
  int32_t status = guarded(err, [&] {
    WaitMark mark(*w->activity, w->seq, w->op);
    w->work->wait(std::chrono::milliseconds(timeout_ms));
    mark.completed();
    return VLM_OK;
  });
  if (status != VLM_OK) {
    bool completed = true;
    try {
      completed = w->work->isCompleted();
    } catch (...) {
    }
    if (!completed) {
      status = VLM_TIMEOUT;
    }
  }
  return status;
}

int32_t vlm_work_is_completed(vlm_work* w, int32_t* out, char** err) {
  return guarded(err, [&] {
    *out = w->work->isCompleted() ? 1 : 0;
    return VLM_OK;
  });
}

void vlm_work_free(vlm_work* w) {
  delete w;
}

} // extern "C"
