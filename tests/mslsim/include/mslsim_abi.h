// The interface between a compiled kernel library (metal_stdlib + the generated launchers) and the
// simulator runtime (runtime/runtime.cpp). Self-contained: kernel code is compiled with -nostdinc.
#pragma once

namespace mslsim {

typedef unsigned long usize;

// Same layout as std::source_location::__impl, which clang's __builtin_source_location() fills in.
struct Loc {
  const char* file;
  const char* function;
  unsigned line;
  unsigned column;
};

// One lane's part in a simdgroup collective: its input, where its result goes, one integer argument.
struct CollArg {
  const void* in;
  void* out;
  long param;
  unsigned lane;
};

// Computes a collective once every live lane of the simdgroup has arrived. lanes[i] is null for a lane
// that does not exist or has returned. Returns null, or a message for a misuse (e.g. a non-uniform
// shuffle mask) that the runtime reports as an error.
typedef const char* (*CollFn)(CollArg* const* lanes);

enum ParamKind { param_buffer, param_threadgroup, param_builtin };

// Kernel parameter attributes that bind per-thread values.
enum Builtin {
  thread_position_in_grid,
  thread_position_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  threads_per_grid,
  thread_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroup_index_in_threadgroup,
  simdgroups_per_threadgroup,
  threads_per_simdgroup,
  thread_execution_width,
  dispatch_simdgroups_per_threadgroup,
  thread_index_in_quadgroup,
  quadgroup_index_in_threadgroup,
  quadgroups_per_threadgroup,
};

struct ParamDesc {
  int kind;   // ParamKind
  int index;  // [[buffer(i)]] / [[threadgroup(i)]] index, or the Builtin
};

// What the C++ type of a parameter says: pointer or reference, and the size of what it refers to.
struct ParamType {
  int is_pointer;
  int is_reference;
  usize referent_size;
};

struct Kernel {
  const char* name;
  void (*entry)();  // runs one simulated thread
  int nparams;
  const ParamDesc* params;
  const ParamType* types;
  unsigned max_threads;  // [[max_total_threads_per_threadgroup(n)]], 0 if absent
};

// Runtime services used by kernel code (defined in runtime.cpp).
void* buffer_address(int index);
void* threadgroup_address(int index);
void builtin_value(int builtin, unsigned out[3]);
void* threadgroup_static(unsigned site, usize size, usize align, const Loc* loc);
void collective(CollFn fn, CollArg* arg, const Loc* loc, const char* name);
void threadgroup_barrier_wait(const Loc* loc);

}  // namespace mslsim
