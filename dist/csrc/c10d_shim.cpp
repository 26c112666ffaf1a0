// C ABI over libtorch's c10d: TCPStore, ProcessGroupGloo, ProcessGroupNCCL,
// and the collectives vlmatch needs, for the Rust crate `vlmatch-dist`.
//
// Every function here is `extern "C"`, catches every C++ exception and turns
// it into a status code plus a malloc'd message (see `Status` below); no
// exception ever crosses into Rust. Handles are heap boxes around c10's
// intrusive pointers, freed by the matching `*_free` function.
//
// ---------------------------------------------------------------------------
// Why ProcessGroupGloo is declared by hand
// ---------------------------------------------------------------------------
// Gloo (the CPU backend) is compiled into libtorch_cpu.so, and the PyPI wheel
// ships torch/csrc/distributed/c10d/ProcessGroupGloo.hpp, but not gloo's own
// headers (gloo/context.h, gloo/transport/device.h, ...), which that header
// includes. So the real header does not compile here. We only need three
// things from the class: its constructor, its destructor and
// `Options::create_default`. Everything else (allreduce, broadcast, ...) is
// called through `c10d::Backend`'s virtual interface, whose header we do have.
//
// Why it works: `new ProcessGroupGloo(...)` allocates `sizeof` of *our*
// declaration and calls the real constructor, whose symbol is resolved from
// libtorch_cpu.so (the mangled names below match `nm -DC libtorch_cpu.so`).
// That constructor initialises the `Backend` base (same header, same layout)
// and its own members, and installs the real vtable. From then on every call
// goes through that vtable into the library; our declaration only has to
// (1) mangle to the same symbols and (2) make `new` allocate at least the
// real object's size. Destruction also runs through the real vtable (the
// library's deleting destructor), which frees with the global operator delete
// (glibc free ignores the size hint, so the larger allocation is fine).
//
// Our declaration has no inline virtual functions and declares the
// destructor out of line, so it is the key function: this file never emits a
// vtable or typeinfo for ProcessGroupGloo. Nor does it construct or destroy
// an `Options` (create_default builds it inside the library; the process
// group owns it afterwards), so no vtable for Options is emitted either.
// `nm -C` of the compiled object shows only undefined (U) symbols for both.
//
// Size: the real class (PyTorch 2.11.0, ProcessGroupGloo.hpp in the wheel)
// adds to `Backend`: shared_ptr store_ (16), intrusive_ptr options_ (8),
// vector contexts_ (24), vector<thread> threads_ (24), bool stop_ + uint32_t
// collectiveCounter_ (8), deque workQueue_ (80), vector workInProgress_ (24),
// mutex (40), two condition_variables (96), uint64_t seq_ (8), size_t
// local_id_ (8), shared_ptr pgStatus_ (16): 352 bytes on x86-64, on top of
// Backend's 136 (both measured with sizeof against the wheel's headers).
// `GlooMembers211` below mirrors exactly those members, and a static_assert
// keeps the reserve at least 8 times its size; we reserve 4 KiB, over 11
// times, so `new` allocates 4240 bytes for a 488-byte object.
//
// What it is tied to: the exact libtorch build (2.11.0, which tch 0.24 pins
// and xtask provisions). A libtorch that changes these constructor
// signatures fails to link (undefined symbol), which is loud. One that grows
// the object past 4 KiB, or reorders `Backend`, would not be caught at build
// time; that is why the reserve is generous and why the crate's multi-process
// tests (dist/tests/multiprocess.rs: 2 and 3 ranks over Gloo, exact results,
// failures) run in every `cargo xtask test`. Re-read ProcessGroupGloo.hpp
// and update GlooMembers211 whenever the libtorch version changes.
//
// ---------------------------------------------------------------------------
// NCCL
// ---------------------------------------------------------------------------
// ProcessGroupNCCL.hpp compiles as is, given nccl.h and the CUDA headers that
// PyPI ships (build.rs finds them and defines VLMATCH_WITH_NCCL and
// USE_C10D_NCCL). Without them the NCCL entry point returns an error.

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef VLMATCH_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

namespace gloo {
class Context;
namespace rendezvous {
class Store;
}
namespace transport {
class Device;
}
} // namespace gloo

namespace c10d {

// The members PyTorch 2.11.0's ProcessGroupGloo adds to Backend, in order,
// with the same types where they are visible here (pointers to gloo types
// and to the nested AsyncWork stand in with the same sizes). Only used to
// size the reserve below; never instantiated.
struct GlooMembers211 {
  std::shared_ptr<::gloo::rendezvous::Store> store_;
  c10::intrusive_ptr<Backend::Options> options_;
  std::vector<std::shared_ptr<::gloo::Context>> contexts_;
  std::vector<std::thread> threads_;
  bool stop_;
  uint32_t collectiveCounter_;
  std::deque<c10::intrusive_ptr<Work>> workQueue_;
  std::vector<c10::intrusive_ptr<Work>> workInProgress_;
  std::mutex workMutex_;
  std::condition_variable workProduceCV_;
  std::condition_variable workConsumeCV_;
  uint64_t seq_;
  size_t local_id_;
  std::shared_ptr<void> pgStatus_;
};

class TORCH_API ProcessGroupGloo : public Backend {
 public:
  struct TORCH_API Options : public Backend::Options {
    explicit Options(
        std::chrono::milliseconds timeout = kBackendDefaultTimeout);

    // Builds the options with one transport device: the interfaces in
    // GLOO_SOCKET_IFNAME if set, else this host's name if it resolves to a
    // local address, else loopback. Defined in libtorch_cpu.so.
    static c10::intrusive_ptr<Options> create_default(
        std::chrono::milliseconds timeout = kBackendDefaultTimeout);

    std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
    int threads{2};
  };

  explicit ProcessGroupGloo(
      const c10::intrusive_ptr<Store>& store,
      int rank,
      int size,
      c10::intrusive_ptr<Options> options);

  ~ProcessGroupGloo() override;

  static constexpr size_t kReservedBytes = 4096;

 private:
  // Space for the real members (see the comment at the top of the file).
  alignas(16) unsigned char reserved_[kReservedBytes];
};

static_assert(
    ProcessGroupGloo::kReservedBytes >= 8 * sizeof(GlooMembers211),
    "keep the ProcessGroupGloo reserve at least 8x the real members");

} // namespace c10d

// ---------------------------------------------------------------------------
// Handles and error reporting
// ---------------------------------------------------------------------------

struct vlm_store {
  c10::intrusive_ptr<c10d::Store> store;
};

// What every user of a process group shares: the backend, and a lock that
// serialises the *launch* of collectives. Collectives are launched from the
// Rust thread that owns the group and, during backward, from autograd's
// threads (the backward of all_gather_with_grad, the reducer's gradient
// hooks). Gloo numbers its collectives from an unsynchronised counter, and
// every rank must launch in the same order, so launches never overlap.
// A capsule in an autograd graph and the reducer's hooks hold their own
// reference, so the backend outlives the Rust handle when they need it.
// Milliseconds since the Unix epoch (the heartbeat's clock).
static int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// What a process group has done, for the heartbeat to publish (Rust's
// `Activity`, dist/src/health.rs): how many collectives this rank has
// entered, the latest one, and the one it waits for. A rank that has entered
// fewer collectives than the others is the one they wait for. Only atomics,
// read from the heartbeat thread while the group works; the fields are read
// one by one, which is fine for a diagnosis. Shared with Rust by its own
// handle, so it outlives a group that is leaked after a failure.
struct Activity {
  std::atomic<uint64_t> entered{0}; // collectives launched, numbered from 1
  std::atomic<int32_t> last_op{0}; // VLM_OP_* of collective `entered`
  std::atomic<int64_t> last_ms{0}; // when it was launched
  // The collective a wait is blocked on (0: none), its VLM_OP_* and since
  // when. A wait that fails or times out leaves it set: it never completed.
  std::atomic<uint64_t> waiting{0};
  std::atomic<int32_t> waiting_op{0};
  std::atomic<int64_t> waiting_ms{0};
};

// A collective as launched: its work, its number on the group and its op.
struct Launched {
  c10::intrusive_ptr<c10d::Work> work;
  uint64_t seq = 0;
  int32_t op = 0;
};

// Marks `seq` as waited for in `activity` while alive; completed() clears
// the mark (a failed wait leaves it).
class WaitMark {
 public:
  WaitMark(Activity& a, uint64_t seq, int32_t op) : a_(a), seq_(seq) {
    if (seq_ != 0) {
      a_.waiting_op.store(op);
      a_.waiting_ms.store(now_ms());
      a_.waiting.store(seq_);
    }
  }
  void completed() {
    uint64_t mine = seq_;
    a_.waiting.compare_exchange_strong(mine, 0);
  }

 private:
  Activity& a_;
  uint64_t seq_;
};

struct PgState : torch::CustomClassHolder {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::mutex launch;
  std::chrono::milliseconds timeout{0};
  int rank = 0;
  int size = 1;
  // The first collective that failed inside C++ (during backward or in the
  // reducer), as a VLM_OP_* code; 0 while none has. Rust reads it so that
  // the group refuses further work, as after a failure it saw itself.
  std::atomic<int32_t> failed_op{0};
  std::shared_ptr<Activity> activity = std::make_shared<Activity>();

  // Launches a collective (a VLM_OP_* `op`) under the launch lock and
  // counts it as entered once the backend has accepted it.
  template <typename F>
  Launched start(int32_t op, F&& launch_fn) {
    std::lock_guard<std::mutex> guard(launch);
    Launched l;
    l.work = launch_fn();
    l.op = op;
    l.seq = activity->entered.load() + 1;
    activity->last_op.store(op);
    activity->last_ms.store(now_ms());
    activity->entered.store(l.seq);
    return l;
  }
};

struct vlm_pg {
  c10::intrusive_ptr<PgState> state;
};

struct vlm_work {
  c10::intrusive_ptr<c10d::Work> work;
  std::shared_ptr<Activity> activity;
  uint64_t seq = 0;
  int32_t op = 0;
};

struct vlm_activity {
  std::shared_ptr<Activity> activity;
};

// Status codes shared with dist/src/ffi.rs.
enum : int32_t {
  VLM_OK = 0,
  VLM_TIMEOUT = 1,
  VLM_ERROR = 2,
};

// Operation codes for PgState::failed_op and Activity, shared with
// dist/src/ffi.rs.
enum : int32_t {
  VLM_OP_NONE = 0,
  VLM_OP_ALLREDUCE = 1,
  VLM_OP_ALLGATHER = 2,
  VLM_OP_BROADCAST = 3,
  VLM_OP_BARRIER = 4,
};

namespace {

char* copy_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

// Runs `body`, turning any exception into VLM_ERROR plus its message in
// `*err`. c10::Error's message is taken without the C++ backtrace.
template <typename F>
int32_t guarded(char** err, F&& body) {
  if (err != nullptr) {
    *err = nullptr;
  }
  try {
    return body();
  } catch (const c10::Error& e) {
    if (err != nullptr) {
      *err = copy_string(e.what_without_backtrace());
    }
  } catch (const std::exception& e) {
    if (err != nullptr) {
      *err = copy_string(e.what());
    }
  } catch (...) {
    if (err != nullptr) {
      *err = copy_string("unknown C++ exception");
    }
  }
  return VLM_ERROR;
}

// c10d's TCPStore client logs a warning with a C++ backtrace ("[W ...
// TCPStore.cpp] [c10d] recvValue failed on SocketImpl(...)") for every
// socket operation that fails, and then throws; we report the exception
// ourselves, in one line. While one of these guards lives, c10's log level
// is at least ERROR. Used only around store calls that do not block (set,
// add, check, delete), so other threads' warnings are held back for a
// moment at most. Nested and concurrent guards share one saved level. A
// TORCH_CPP_LOG_LEVEL set by the user is left alone.
constexpr int kC10LogError = 2; // c10's ERROR severity (GLOG_ERROR)
std::mutex quiet_mu;
int quiet_depth = 0;
int quiet_saved = 0;

class QuietStoreWarnings {
 public:
  QuietStoreWarnings() : on_(allowed()) {
    if (!on_) {
      return;
    }
    std::lock_guard<std::mutex> guard(quiet_mu);
    if (quiet_depth++ == 0) {
      quiet_saved = FLAGS_caffe2_log_level;
      if (FLAGS_caffe2_log_level < kC10LogError) {
        FLAGS_caffe2_log_level = kC10LogError;
      }
    }
  }
  ~QuietStoreWarnings() {
    if (!on_) {
      return;
    }
    std::lock_guard<std::mutex> guard(quiet_mu);
    if (--quiet_depth == 0) {
      FLAGS_caffe2_log_level = quiet_saved;
    }
  }
  QuietStoreWarnings(const QuietStoreWarnings&) = delete;
  QuietStoreWarnings& operator=(const QuietStoreWarnings&) = delete;

 private:
  static bool allowed() {
    static const bool yes = std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr;
    return yes;
  }
  bool on_;
};

std::vector<std::string> key_list(const char* const* keys, size_t n) {
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.emplace_back(keys[i]);
  }
  return out;
}

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

int32_t finish_work(const PgState& pg, Launched launched, vlm_work** out) {
  *out = new vlm_work{
      std::move(launched.work), pg.activity, launched.seq, launched.op};
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

} // namespace

// ---------------------------------------------------------------------------
// Collectives inside autograd, and the gradient reducer
// ---------------------------------------------------------------------------

namespace {

// Waits for `work` up to `timeout`. On failure records `op` as the group's
// failed collective and rethrows; a work still pending after the deadline
// becomes a c10::Error that says so (Rust classifies it as a timeout).
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

void vlm_string_free(char* s) {
  std::free(s);
}

void vlm_bytes_free(uint8_t* b) {
  std::free(b);
}

int32_t vlm_has_nccl(void) {
#ifdef VLMATCH_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

int32_t vlm_store_tcp_new(
    const char* host,
    uint16_t port,
    int32_t world_size,
    int32_t is_master,
    int64_t timeout_ms,
    vlm_store** out,
    char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_master != 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new vlm_store{c10::static_intrusive_pointer_cast<c10d::Store>(
        std::move(store))};
    return VLM_OK;
  });
}

// Another client connection to a running store (no rendezvous counting),
// for a thread that must not queue behind the main connection's waits.
int32_t vlm_store_tcp_client(
    const char* host,
    uint16_t port,
    int64_t timeout_ms,
    vlm_store** out,
    char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = false;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new vlm_store{c10::static_intrusive_pointer_cast<c10d::Store>(
        std::move(store))};
    return VLM_OK;
  });
}

// The same store seen through c10d's PrefixStore: every key becomes
// `prefix/key`. Shares the connection of `s`.
int32_t vlm_store_prefixed(
    vlm_store* s,
    const char* prefix,
    vlm_store** out,
    char** err) {
  return guarded(err, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix), s->store);
    *out = new vlm_store{c10::static_intrusive_pointer_cast<c10d::Store>(
        std::move(store))};
    return VLM_OK;
  });
}

void vlm_store_free(vlm_store* s) {
  delete s;
}

int32_t vlm_store_set(
    vlm_store* s,
    const char* key,
    const uint8_t* data,
    size_t len,
    char** err) {
  return guarded(err, [&] {
    QuietStoreWarnings quiet;
    std::vector<uint8_t> value(data, data + len);
    s->store->set(std::string(key), value);
    return VLM_OK;
  });
}

// Waits up to `timeout_ms` for `key`, then reads it into a malloc'd buffer
// (free with vlm_bytes_free).
int32_t vlm_store_get(
    vlm_store* s,
    const char* key,
    int64_t timeout_ms,
    uint8_t** data,
    size_t* len,
    char** err) {
  return guarded(err, [&] {
    std::string k(key);
    s->store->wait({k}, std::chrono::milliseconds(timeout_ms));
    std::vector<uint8_t> value = s->store->get(k);
    *len = value.size();
    size_t bytes = value.empty() ? 1 : value.size();
    *data = static_cast<uint8_t*>(std::malloc(bytes));
    if (*data == nullptr) {
      throw std::bad_alloc();
    }
    if (!value.empty()) {
      std::memcpy(*data, value.data(), value.size());
    }
    return VLM_OK;
  });
}

int32_t vlm_store_add(
    vlm_store* s,
    const char* key,
    int64_t delta,
    int64_t* out,
    char** err) {
  return guarded(err, [&] {
    QuietStoreWarnings quiet;
    *out = s->store->add(std::string(key), delta);
    return VLM_OK;
  });
}

int32_t vlm_store_wait(
    vlm_store* s,
    const char* const* keys,
    size_t n,
    int64_t timeout_ms,
    char** err) {
  return guarded(err, [&] {
    s->store->wait(key_list(keys, n), std::chrono::milliseconds(timeout_ms));
    return VLM_OK;
  });
}

// Whether all `keys` exist, without waiting.
int32_t vlm_store_check(
    vlm_store* s,
    const char* const* keys,
    size_t n,
    int32_t* out,
    char** err) {
  return guarded(err, [&] {
    QuietStoreWarnings quiet;
    *out = s->store->check(key_list(keys, n)) ? 1 : 0;
    return VLM_OK;
  });
}

int32_t vlm_store_delete(
    vlm_store* s,
    const char* key,
    int32_t* out,
    char** err) {
  return guarded(err, [&] {
    QuietStoreWarnings quiet;
    *out = s->store->deleteKey(std::string(key)) ? 1 : 0;
    return VLM_OK;
  });
}

// ---------------------------------------------------------------------------
// Process groups
// ---------------------------------------------------------------------------

// A Gloo process group over `prefix`-scoped keys of the store, so several
// groups can share one store.
int32_t vlm_pg_gloo_new(
    vlm_store* s,
    const char* prefix,
    int32_t rank,
    int32_t size,
    int64_t timeout_ms,
    vlm_pg** out,
    char** err) {
  return guarded(err, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix), s->store);
    auto opts = c10d::ProcessGroupGloo::Options::create_default(
        std::chrono::milliseconds(timeout_ms));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::static_intrusive_pointer_cast<c10d::Store>(store),
        rank,
        size,
        std::move(opts));
    *out = new_pg(
        c10::static_intrusive_pointer_cast<c10d::Backend>(std::move(pg)),
        timeout_ms,
        rank,
        size);
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
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix), s->store);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        c10::static_intrusive_pointer_cast<c10d::Store>(store),
        rank,
        size,
        std::move(opts));
    *out = new_pg(
        c10::static_intrusive_pointer_cast<c10d::Backend>(std::move(pg)),
        timeout_ms,
        rank,
        size);
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
      return finish_work(
          *pg->state,
          pg->state->start(
              VLM_OP_ALLREDUCE,
              [&] { return pg->state->backend->allreduce(list, opts); }),
          out);
    }
    c10d::AllreduceCoalescedOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return finish_work(
        *pg->state,
        pg->state->start(
            VLM_OP_ALLREDUCE,
            [&] { return pg->state->backend->allreduce_coalesced(list, opts); }),
        out);
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
    return finish_work(
        *pg->state,
        pg->state->start(
            VLM_OP_ALLGATHER,
            [&] { return pg->state->backend->_allgather_base(o, i); }),
        out);
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
    return finish_work(
        *pg->state,
        pg->state->start(
            VLM_OP_BROADCAST,
            [&] { return pg->state->backend->broadcast(list, opts); }),
        out);
  });
}

int32_t vlm_pg_barrier(vlm_pg* pg, vlm_work** out, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions opts;
    return finish_work(
        *pg->state,
        pg->state->start(
            VLM_OP_BARRIER, [&] { return pg->state->backend->barrier(opts); }),
        out);
  });
}

// The collective (a VLM_OP_* code) that failed inside C++ on this group
// (in backward or in the reducer), 0 if none.
int32_t vlm_pg_failed_op(vlm_pg* pg) {
  return pg->state->failed_op.load();
}

// A handle on the group's Activity (free with vlm_activity_free), readable
// from any thread, also after the group is gone.
vlm_activity* vlm_pg_activity(vlm_pg* pg) {
  return new vlm_activity{pg->state->activity};
}

// Reads the activity into out[0..6]: entered, last_op, last_ms, waiting,
// waiting_op, waiting_ms.
void vlm_activity_read(vlm_activity* a, int64_t* out) {
  const Activity& x = *a->activity;
  out[0] = static_cast<int64_t>(x.entered.load());
  out[1] = x.last_op.load();
  out[2] = x.last_ms.load();
  out[3] = static_cast<int64_t>(x.waiting.load());
  out[4] = x.waiting_op.load();
  out[5] = x.waiting_ms.load();
}

void vlm_activity_free(vlm_activity* a) {
  delete a;
}

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
