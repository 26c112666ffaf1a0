// The shared internal header of vlmatch-dist's C++ shim over libtorch's
// c10d (TCPStore, ProcessGroupGloo, ProcessGroupNCCL), the C ABI that
// dist/src/ffi.rs and its modules declare. One file per concern, each
// mirrored by a module of dist/src/ffi/:
//
//   store.cpp     TCPStore clients and prefixes            (ffi/store.rs)
//   group.cpp     process groups, collectives, their work  (ffi/group.rs)
//   autograd.cpp  the differentiable all-gather            (ffi/autograd.rs)
//   reducer.cpp   the bucketed gradient reducer            (ffi/reducer.rs)
//   health.cpp    what groups have done, for heartbeats    (ffi/health.rs)
//   checkpoint.cpp activation checkpointing, Rust recompute (ffi/checkpoint.rs)
//
// gloo_decl.h holds the hand-declared ProcessGroupGloo (only group.cpp
// includes it); this header holds what several files share: the handle
// types, the status and operation codes, a group's state and activity, and
// the exception guard.
//
// Every function of the ABI is `extern "C"`, catches every C++ exception and
// turns it into a status code plus a malloc'd message (see `guarded` below);
// no exception ever crosses into Rust. Handles are heap boxes around c10's
// intrusive pointers, freed by the matching `*_free` function.

#pragma once

// First: refuse any libtorch but 2.11.x, before its other headers.
#include "version_check.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

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
  VLM_OP_REDUCESCATTER = 5,
};

// ---------------------------------------------------------------------------
// Handles and error reporting
// ---------------------------------------------------------------------------

struct vlm_store {
  c10::intrusive_ptr<c10d::Store> store;
};

// Milliseconds since the Unix epoch (the heartbeat's clock).
inline int64_t now_ms() {
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

// What every user of a process group shares: the backend, and a lock that
// serialises the *launch* of collectives. Collectives are launched from the
// Rust thread that owns the group and, during backward, from autograd's
// threads (the backward of all_gather_with_grad, the reducer's gradient
// hooks). Gloo numbers its collectives from an unsynchronised counter, and
// every rank must launch in the same order, so launches never overlap.
// A capsule in an autograd graph and the reducer's hooks hold their own
// reference, so the backend outlives the Rust handle when they need it.
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

inline char* copy_string(const std::string& s) {
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
inline int32_t guarded(char** err, F&& body) {
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

// Defined in group.cpp, for the collectives that C++ launches and waits for
// itself (autograd.cpp's backward, reducer.cpp's buckets).
//
// Waits for `launched` up to `timeout`. On failure records its op as the
// group's failed collective and rethrows; a work still pending after the
// deadline becomes a c10::Error that says so (Rust classifies it as a
// timeout).
void wait_or_fail(
    PgState& pg,
    const Launched& launched,
    std::chrono::milliseconds timeout);

// Launches an in-place SUM all-reduce of `t` on `pg`.
Launched start_allreduce_sum(PgState& pg, const at::Tensor& t);
