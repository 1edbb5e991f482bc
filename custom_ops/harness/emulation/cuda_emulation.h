// A small CPU emulation of the CUDA features custom_ops/kernels/*.cu.cc
// use, so that the very same kernel source runs, compiled by g++, where there
// is no GPU. Blocks of a grid run one after another; the `blockDim.x`
// threads of a block are fibers on the calling OS thread, each
// running until it reaches a barrier (__syncthreads, or the two lane
// barriers around a warp shuffle's exchange through memory), then yielding
// to a runnable one picked by the Schedule (round robin, lowest thread
// first, highest first). Dynamic shared memory is one buffer per launch,
// "device"
// pointers are host pointers, and the runtime calls the kernels make are
// stubs (cuda_runtime_stubs.h). Not thread-safe: one launch at a time in one
// process.
//
// It checks the real source's indexing, masking, shared-memory layout,
// barrier and shuffle structure (a barrier some thread never reaches
// aborts; under the lowest- and highest-first schedules one warp runs as far
// as it can before the others, so a missing barrier between one warp's
// shared-memory access and another's usually gives a wrong answer) and its
// float32 arithmetic in the same order. It does
// not model timing, coalescing, bank conflicts, divergence costs or the
// memory model; compute-sanitizer on a GPU remains the check for races.
//
// Also emulated: __syncwarp, float atomicAdd, and the wmma API of <mma.h>
// (fragments, load / store / mma / fill) for the cross-entropy kernels:
// every thread of a warp holds the whole 16 x 16 fragment; lane 0 computes
// each product (float32 FMAs in k order; tensor cores multiply exactly and
// may add in another order) and the other lanes copy it, with the warp
// barriers the *_sync calls imply. Optionally (tfrec_emu_set_shared_fill)
// every block's shared memory starts as NaN bytes, so a kernel that reads
// shared memory it has not written gets NaN instead of a lucky zero.
//
// Include it first, then the .cu.cc (see ragged_attention_emulated.cc and
// cross_entropy_emulated.cc).
#ifndef TFREC_FAST_HARNESS_EMULATION_CUDA_EMULATION_H_
#define TFREC_FAST_HARNESS_EMULATION_CUDA_EMULATION_H_

#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

// 16-bit float types of our own instead of cuda_fp16.h / cuda_bf16.h, whose
// recent versions need libcu++ headers that TensorFlow's bundled copy of
// the CUDA headers lacks: with these, TF's headers are enough to build the
// emulation. Same storage and round-to-nearest-even conversions.
#define __CUDA_FP16_H__
#define __CUDA_BF16_H__
#ifndef __FLT16_MAX__
#error "the CUDA emulation needs the compiler's _Float16 (GCC >= 12 on x86-64)"
#endif
struct __half {
  std::uint16_t x = 0;
};
struct __nv_bfloat16 {
  std::uint16_t x = 0;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, sizeof(f));
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  std::memcpy(&h.x, &f, sizeof(f));
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.x = 0x7FC0;
  } else {
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    b.x = static_cast<std::uint16_t>(bits >> 16);
  }
  return b;
}

// The CUDA headers, read by a host compiler, define these as attributes g++
// does not know; the emulation wants plain C++.
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

// Fiber switches: on x86-64 a minimal stack switch (callee-saved registers
// and the stack pointer; ~10 ns), elsewhere ucontext (swapcontext also
// saves the signal mask with a system call, ~30x slower).
#if defined(__x86_64__) && !defined(TFREC_EMU_UCONTEXT)
#define TFREC_EMU_FAST_SWITCH 1
extern "C" void tfrec_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl tfrec_emu_switch
  .hidden tfrec_emu_switch
  .type tfrec_emu_switch, @function
tfrec_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tfrec_emu_switch, .-tfrec_emu_switch
)");
#endif

namespace tfrec_emu {

// One thread block at a time, its threads as fibers on the calling OS
// thread: a fiber that must wait at a barrier yields to the scheduler until
// the barrier's generation moves on. Deterministic, and fast on few cores
// (OS threads would spend their time in futexes).
//
// Which runnable fiber the scheduler resumes next. Races between warps
// show up only when one side runs ahead of the other, so checks run under
// more than one order.
enum class Schedule : int {
  kRoundRobin = 0,    // every runnable fiber once per sweep
  kLowestFirst = 1,   // always the lowest runnable thread: warp 0 runs ahead
  kHighestFirst = 2,  // always the highest: the last warp runs ahead
};

inline Schedule& CurrentSchedule() {
  static Schedule schedule = Schedule::kRoundRobin;
  return schedule;
}

// Byte every block's shared memory starts with (0: zeros, the historical
// behaviour; 0xFF: NaN floats).
inline int& SharedFillByte() {
  static int fill = 0;
  return fill;
}

struct Block {
  int threads = 0;
#ifdef TFREC_EMU_FAST_SWITCH
  std::vector<void*> stack_pointers;
  void* scheduler_sp = nullptr;
#else
  std::vector<ucontext_t> contexts;
  ucontext_t scheduler;
#endif
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  std::vector<int> wait_kind;            // -2: running, -1: block, w: warp
  std::vector<unsigned> wait_generation;
  std::function<void()> body;
  int current = 0;
  int block_arrived = 0;
  unsigned block_generation = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_generation;
  std::vector<unsigned long long> exchange;  // one shuffle slot per thread
  std::vector<float4> shared;                // dynamic shared memory
};

inline Block& CurrentBlock() {
  static Block block;
  return block;
}

inline dim3 thread_index;
inline dim3 block_index;
inline dim3 grid_dim;
inline dim3 block_dim;

constexpr size_t kFiberStackBytes = 256 * 1024;

inline float* DynamicShared() {
  return reinterpret_cast<float*>(CurrentBlock().shared.data());
}

inline void Yield() {
  Block& b = CurrentBlock();
#ifdef TFREC_EMU_FAST_SWITCH
  tfrec_emu_switch(&b.stack_pointers[b.current], b.scheduler_sp);
#else
  swapcontext(&b.contexts[b.current], &b.scheduler);
#endif
}

inline void FiberMain() {
  Block& b = CurrentBlock();
  b.body();
  b.done[b.current] = 1;
#ifdef TFREC_EMU_FAST_SWITCH
  Yield();       // the scheduler never resumes a finished fiber
  std::abort();
#endif
  // ucontext: returning resumes uc_link, the scheduler.
}

// Prepares fiber t to start in FiberMain.
inline void StartFiber(Block& b, int t) {
#ifdef TFREC_EMU_FAST_SWITCH
  auto top = reinterpret_cast<std::uintptr_t>(b.stacks[t].get()) +
             kFiberStackBytes;
  void** sp = reinterpret_cast<void**>(top & ~std::uintptr_t{15});
  *--sp = nullptr;  // FiberMain's return address: it never returns
  *--sp = reinterpret_cast<void*>(&FiberMain);  // where the switch "returns"
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12-r15
  b.stack_pointers[t] = sp;
#else
  getcontext(&b.contexts[t]);
  b.contexts[t].uc_stack.ss_sp = b.stacks[t].get();
  b.contexts[t].uc_stack.ss_size = kFiberStackBytes;
  b.contexts[t].uc_link = &b.scheduler;
  makecontext(&b.contexts[t], FiberMain, 0);
#endif
}

inline void Resume(Block& b, int t) {
#ifdef TFREC_EMU_FAST_SWITCH
  tfrec_emu_switch(&b.scheduler_sp, b.stack_pointers[t]);
#else
  swapcontext(&b.scheduler, &b.contexts[t]);
#endif
}

// All threads of the block (warp = -1) or of one warp meet here.
inline void Barrier(int warp) {
  Block& b = CurrentBlock();
  int& arrived = warp < 0 ? b.block_arrived : b.warp_arrived[warp];
  unsigned& generation =
      warp < 0 ? b.block_generation : b.warp_generation[warp];
  const int expected = warp < 0 ? b.threads : 32;
  const unsigned mine = generation;
  if (++arrived == expected) {
    arrived = 0;
    ++generation;
    return;
  }
  b.wait_kind[b.current] = warp < 0 ? -1 : warp;
  b.wait_generation[b.current] = mine;
  while (generation == mine) Yield();
  b.wait_kind[b.current] = -2;
}

inline bool Runnable(const Block& b, int t) {
  if (b.done[t]) return false;
  const int kind = b.wait_kind[t];
  if (kind == -2) return true;
  const unsigned now =
      kind == -1 ? b.block_generation : b.warp_generation[kind];
  return now != b.wait_generation[t];
}

template <typename V>
V Exchange(V value, int source_lane) {
  static_assert(sizeof(V) <= sizeof(unsigned long long), "shuffle width");
  Block& b = CurrentBlock();
  const int t = static_cast<int>(thread_index.x);
  const int warp = t / 32;
  std::memcpy(&b.exchange[t], &value, sizeof(V));
  Barrier(warp);
  V out;
  std::memcpy(&out, &b.exchange[warp * 32 + source_lane], sizeof(V));
  Barrier(warp);
  return out;
}

// Runs kernel(args...) over grid x block threads; one launch at a time.
template <typename Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args... args) const {
    const int threads = static_cast<int>(block.x);
    if (threads <= 0 || threads % 32 != 0 || block.y != 1 || block.z != 1) {
      std::abort();  // the kernels here use 1-D blocks of whole warps
    }
    Block& b = CurrentBlock();
    b.threads = threads;
#ifdef TFREC_EMU_FAST_SWITCH
    b.stack_pointers.resize(threads);
#else
    b.contexts.resize(threads);
#endif
    while (static_cast<int>(b.stacks.size()) < threads) {
      b.stacks.emplace_back(new char[kFiberStackBytes]);
    }
    b.warp_arrived.assign(threads / 32, 0);
    b.warp_generation.assign(threads / 32, 0);
    b.exchange.assign(threads, 0);
    b.shared.assign((shared_bytes + sizeof(float4) - 1) / sizeof(float4) + 1,
                    float4{0, 0, 0, 0});
    const Kernel k = kernel;
    b.body = [k, args...]() { k(args...); };
    grid_dim = grid;
    block_dim = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          block_index = dim3(x, y, z);
          if (SharedFillByte() != 0) {
            std::memset(static_cast<void*>(b.shared.data()),
                        SharedFillByte(), b.shared.size() * sizeof(float4));
          }
          b.block_arrived = 0;
          b.done.assign(threads, 0);
          b.wait_kind.assign(threads, -2);
          b.wait_generation.assign(threads, 0);
          for (int t = 0; t < threads; ++t) StartFiber(b, t);
          const Schedule schedule = CurrentSchedule();
          int finished = 0;
          int next = 0;  // round robin position
          while (finished < threads) {
            int t = -1;
            if (schedule == Schedule::kRoundRobin) {
              for (int i = 0; i < threads && t < 0; ++i) {
                const int c = (next + i) % threads;
                if (Runnable(b, c)) t = c;
              }
              next = t + 1;
            } else if (schedule == Schedule::kLowestFirst) {
              for (int c = 0; c < threads && t < 0; ++c) {
                if (Runnable(b, c)) t = c;
              }
            } else {
              for (int c = threads - 1; c >= 0 && t < 0; --c) {
                if (Runnable(b, c)) t = c;
              }
            }
            // No runnable thread before all are done: a barrier that not
            // every thread reaches (a deadlock on a GPU).
            if (t < 0) std::abort();
            b.current = t;
            thread_index = dim3(t, 0, 0);
            Resume(b, t);
            if (b.done[t]) ++finished;
          }
          if (b.block_arrived != 0) std::abort();  // unbalanced barriers
        }
      }
    }
  }
};

template <typename Kernel>
Launcher<Kernel> MakeLauncher(Kernel kernel, dim3 grid, dim3 block,
                              size_t shared_bytes) {
  return Launcher<Kernel>{kernel, grid, block, shared_bytes};
}

}  // namespace tfrec_emu

#define threadIdx (::tfrec_emu::thread_index)
#define blockIdx (::tfrec_emu::block_index)
#define gridDim (::tfrec_emu::grid_dim)
#define blockDim (::tfrec_emu::block_dim)

// The launch and dynamic shared memory hooks of
// custom_ops/kernels/gpu_kernel_helpers.cu.h.
#define TFREC_KERNEL_LAUNCH(kernel, grid, block, smem, stream) \
  (static_cast<void>(stream),                                  \
   ::tfrec_emu::MakeLauncher(kernel, dim3(grid), dim3(block), (smem)))
#define TFREC_EMULATED_SHARED() ::tfrec_emu::DynamicShared()

inline void __syncthreads() { ::tfrec_emu::Barrier(-1); }

template <typename V>
V __shfl_xor_sync(unsigned /*mask*/, V value, int lane_mask) {
  const int lane = static_cast<int>(::tfrec_emu::thread_index.x) % 32;
  return ::tfrec_emu::Exchange(value, lane ^ lane_mask);
}

template <typename V>
V __shfl_up_sync(unsigned /*mask*/, V value, unsigned delta) {
  const int lane = static_cast<int>(::tfrec_emu::thread_index.x) % 32;
  const int source = lane - static_cast<int>(delta);
  return ::tfrec_emu::Exchange(value, source >= 0 ? source : lane);
}

inline unsigned long long atomicMin(unsigned long long* address,
                                    unsigned long long value) {
  // One OS thread runs every fiber, and fibers switch only at barriers.
  const unsigned long long old = *address;
  *address = std::min(old, value);
  return old;
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;  // fibers switch only at barriers
  *address = old + value;
  return old;
}

// Every lane of the warp meets here.
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  ::tfrec_emu::Barrier(static_cast<int>(::tfrec_emu::thread_index.x) / 32);
}

using std::min;

// ---------------------------------------------------------------------------
// wmma (<mma.h>): whole fragments per thread.
#define TFREC_EMULATED_WMMA 1
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T,
          typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
};

inline float EmuElement(float v) { return v; }
inline float EmuElement(__half v) { return __half2float(v); }
inline float EmuElement(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void EmuWarpBarrier() { __syncwarp(); }

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "needs a layout");
  using F = fragment<Use, M, N, K, T, Layout>;
  EmuWarpBarrier();
  const bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.x[r * F::kCols + c] = row ? p[r * ldm + c] : p[r + c * ldm];
    }
  }
  EmuWarpBarrier();
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p,
                              const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  EmuWarpBarrier();
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      const float v = f.x[r * N + c];
      if (layout == mem_row_major) {
        p[r * ldm + c] = v;
      } else {
        p[r + c * ldm] = v;
      }
    }
  }
  EmuWarpBarrier();
}

template <typename Use, int M, int N, int K, typename T, typename Layout,
          typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

// Lane 0 computes the product into a per-warp buffer, every lane copies
// it (all lanes hold the same fragments).
inline float* EmuWarpScratch() {
  static float scratch[32][256];  // blocks of up to 1024 threads
  return scratch[static_cast<int>(::tfrec_emu::thread_index.x) / 32];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  static_assert(M * N <= 256, "fragment size");
  float* out = EmuWarpScratch();
  EmuWarpBarrier();  // every lane is here: the scratch is free
  if (::tfrec_emu::thread_index.x % 32 == 0) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        float acc = c.x[i * N + j];
        for (int k = 0; k < K; ++k) {
          acc = std::fma(EmuElement(a.x[i * K + k]),
                         EmuElement(b.x[k * N + j]), acc);
        }
        out[i * N + j] = acc;
      }
    }
  }
  EmuWarpBarrier();
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
  EmuWarpBarrier();  // every lane has copied before the scratch is reused
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // TFREC_FAST_HARNESS_EMULATION_CUDA_EMULATION_H_
