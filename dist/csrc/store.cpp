// The store: TCPStore servers and clients, prefixed views, and the buffers
// the shim hands out (dist/src/ffi/store.rs).

#include "shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

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

// `store` as a new handle.
template <typename S>
vlm_store* new_store(c10::intrusive_ptr<S> store) {
  return new vlm_store{
      c10::static_intrusive_pointer_cast<c10d::Store>(std::move(store))};
}

// A TCPStore connection to `host:port` with `opts`, whose port and timeout
// (`timeout_ms`) are set here.
vlm_store* tcp_store(
    const char* host,
    uint16_t port,
    int64_t timeout_ms,
    c10d::TCPStoreOptions opts) {
  opts.port = port;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  return new_store(
      c10::make_intrusive<c10d::TCPStore>(std::string(host), opts));
}

} // namespace

extern "C" {

void vlm_string_free(char* s) {
  std::free(s);
}

void vlm_bytes_free(uint8_t* b) {
  std::free(b);
}

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
    opts.isServer = is_master != 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = true;
    *out = tcp_store(host, port, timeout_ms, opts);
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
    opts.isServer = false;
    opts.waitWorkers = false;
    *out = tcp_store(host, port, timeout_ms, opts);
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
    *out = new_store(
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store));
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

} // extern "C"
