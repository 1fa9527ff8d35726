// The launch request: shared by runtime.cpp (mslsim_run), runner.cpp and tests/mslsim/launch.py (ctypes).
#pragma once

extern "C" {

// One bound buffer of one run.
struct mslsim_buffer {
  int slot;
  int unused;
  const void* source;  // initial contents
  void* result;        // receives the contents after the run
  unsigned long size;
};

// One run of one schedule (the argument of mslsim_run).
struct mslsim_run_desc {
  int kernel;
  int schedule;
  unsigned grid[3];
  unsigned threads[3];
  int nbuffers;
  const mslsim_buffer* buffers;
  unsigned long threadgroup_memory[32];  // bytes per [[threadgroup(i)]] slot, 0 if not given
  unsigned long long seed;
  char* error;  // receives a message if the run fails
  unsigned long error_size;
};

enum { mslsim_max_schedules = 4, mslsim_error_size = 8192 };

// A request in the shared memory file that the runner maps: this header, then the input bytes and one
// result area per schedule at the given offsets.
struct mslsim_request_buffer {
  int slot;
  int unused;
  unsigned long input;  // offset of the initial contents
  unsigned long size;
  unsigned long result[mslsim_max_schedules];  // offset of the contents after each schedule
};

struct mslsim_request {
  char error[mslsim_error_size];
  long progress;  // index of the schedule running or last run
  int kernel;
  int nschedules;
  int schedules[mslsim_max_schedules];
  unsigned grid[3];
  unsigned threads[3];
  int nbuffers;
  int unused;
  unsigned long threadgroup_memory[32];
  unsigned long long seed;
  mslsim_request_buffer buffers[32];
};
}
