// The shim compiles only against libtorch 2.11.x.
//
// gloo_decl.h declares c10d::ProcessGroupGloo by hand from 2.11's
// ProcessGroupGloo.hpp (its constructor's mangled name, a byte reserve sized
// from 2.11's members), and tch 0.24 binds 2.11. Against another libtorch the
// shim could link and then corrupt memory in a distributed run, so it must
// not compile: shim.h and gloo_decl.h include this header before anything
// else. To move to another libtorch, re-read ProcessGroupGloo.hpp, update
// GlooMembers211 in gloo_decl.h and the numbers below together.
//
// The headers define TORCH_VERSION_MAJOR/MINOR/PATCH in torch/version.h
// (include/torch/csrc/api/include/torch/version.h in the PyPI wheel, which
// includes torch/headeronly/version.h). `#error` does not expand macros, so
// the static_assert below is what names the version found; tests/versions.rs
// compiles this header alone against a fake 2.10.0 and checks both lines.

#pragma once

#if defined(__has_include)
#if !__has_include(<torch/version.h>)
#error "vlmatch-dist: torch/version.h not found; the c10d shim needs libtorch 2.11.x's headers (run `cargo xtask setup`)"
#endif
#endif

#include <torch/version.h>

#if !defined(TORCH_VERSION_MAJOR) || !defined(TORCH_VERSION_MINOR)
#error "vlmatch-dist: torch/version.h defines no TORCH_VERSION_MAJOR/MINOR; the c10d shim needs libtorch 2.11.x (run `cargo xtask setup`)"
#endif

#define VLMATCH_STRINGIFY_(x) #x
#define VLMATCH_STRINGIFY(x) VLMATCH_STRINGIFY_(x)

#if TORCH_VERSION_MAJOR != 2 || TORCH_VERSION_MINOR != 11
#error "vlmatch-dist: the c10d shim needs libtorch 2.11.x (gloo_decl.h mirrors 2.11's ProcessGroupGloo); the version found is in the next error. Unset LIBTORCH or point it at libtorch 2.11, or let `cargo xtask setup` provision torch 2.11.0"
static_assert(TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11,
              "vlmatch-dist needs libtorch 2.11.x, found libtorch " VLMATCH_STRINGIFY(
                  TORCH_VERSION_MAJOR) "." VLMATCH_STRINGIFY(TORCH_VERSION_MINOR) "." VLMATCH_STRINGIFY(TORCH_VERSION_PATCH));
#endif
