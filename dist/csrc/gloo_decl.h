// ---------------------------------------------------------------------------
// Why ProcessGroupGloo is declared by hand (this header; group.cpp alone
// includes it)
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

#pragma once

// This layout is 2.11's: refuse any other libtorch (see version_check.h).
#include "version_check.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
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
