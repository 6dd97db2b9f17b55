// gemma_jax_block_matmul: an XLA FFI custom call for the CPU (`cpu_kernel.py` builds and registers it).
//
//   y[M, O] = x[M, I] . W^T,  W[o, i] = w[o, i] * scale[o, i / 32]
//
// x float32 [M, I]; w int8 [O, I], each row of the weight (one output channel) in blocks of 32 along
// the input; scale float32 [O, I / 32], one per block; y float32 [M, O]. I must be a multiple of 32.
// The weight is read where it lies, 1 byte per weight: each block is widened to float32 in
// registers, its dot with each row of x summed there and scaled once. Outputs are split into strips
// run on XLA's intra-op thread pool and on the calling thread; within a strip every row of x is
// taken while the strip's weights are in cache (rows in tiles of 8, 4, 3, 2 or 1, each tile one pass:
// a block widened once serves every row of its tile).
//
// A strip is taken from a shared counter, so a task the pool starts late (its threads busy with
// other work) finds nothing left and returns: the call never waits on a task that has not started.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 Widen8(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [0, MT) of x (row stride I) against outputs [o0, o1); y's row stride is O.
template <int MT>
void Tile(const float* x, int64_t I, const int8_t* w, const float* scale, float* y, int64_t O, int64_t o0,
          int64_t o1) {
  const int64_t blocks = I / kBlock;
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* wo = w + o * I;
    const float* so = scale + o * blocks;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* wb = wo + b * kBlock;
      const __m256 w0 = Widen8(wb), w1 = Widen8(wb + 8), w2 = Widen8(wb + 16), w3 = Widen8(wb + 24);
      const __m256 s = _mm256_broadcast_ss(so + b);
      for (int m = 0; m < MT; ++m) {
        const float* xb = x + m * I + b * kBlock;
        __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
        t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), t);
        t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), t);
        t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), t);
        acc[m] = _mm256_fmadd_ps(t, s, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * O + o] = Sum8(acc[m]);
  }
}
#else
// Portable form (any compiler, vectorized where it can): the same sums in the same blocks.
template <int MT>
void Tile(const float* x, int64_t I, const int8_t* w, const float* scale, float* y, int64_t O, int64_t o0,
          int64_t o1) {
  const int64_t blocks = I / kBlock;
  for (int64_t o = o0; o < o1; ++o) {
    float acc[MT] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* wb = w + o * I + b * kBlock;
      for (int m = 0; m < MT; ++m) {
        const float* xb = x + m * I + b * kBlock;
        float t = 0.0f;
        for (int64_t k = 0; k < kBlock; ++k) t += static_cast<float>(wb[k]) * xb[k];
        acc[m] += t * scale[o * blocks + b];
      }
    }
    for (int m = 0; m < MT; ++m) y[m * O + o] = acc[m];
  }
}
#endif

// Outputs [o0, o1) for every row of x.
void Strip(const float* x, int64_t M, int64_t I, const int8_t* w, const float* scale, float* y, int64_t O,
           int64_t o0, int64_t o1) {
  for (int64_t m = 0; m < M;) {
    const float* xm = x + m * I;
    float* ym = y + m * O;
    switch (std::min<int64_t>(M - m, 8)) {
      case 8: Tile<8>(xm, I, w, scale, ym, O, o0, o1); m += 8; break;
      case 7: case 6: case 5:  // 4 now, the rest next
      case 4: Tile<4>(xm, I, w, scale, ym, O, o0, o1); m += 4; break;
      case 3: Tile<3>(xm, I, w, scale, ym, O, o0, o1); m += 3; break;
      case 2: Tile<2>(xm, I, w, scale, ym, O, o0, o1); m += 2; break;
      default: Tile<1>(xm, I, w, scale, ym, O, o0, o1); m += 1; break;
    }
  }
}

struct Job {
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t M, I, O, strip, strips;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < strips;) {
      Strip(x, M, I, w, scale, y, O, c * strip, std::min(O, (c + 1) * strip));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error BlockMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[1] || wd[1] % kBlock != 0 ||
      sd[0] != wd[0] || sd[1] != wd[1] / kBlock) {
    return ffi::Error::InvalidArgument(
        "gemma_jax_block_matmul: x [M, I], w [O, I] int8, scale [O, I / 32] with I a multiple of 32");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->scale = scale.typed_data();
  job->y = y->typed_data();
  job->M = xd[0];
  job->I = xd[1];
  job->O = wd[0];
  if (job->M == 0 || job->O == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About 4 strips per thread (a busy thread then holds back little), of at least 16 outputs.
  job->strip = std::max<int64_t>(16, (job->O + 4 * threads - 1) / (4 * threads));
  job->strips = (job->O + job->strip - 1) / job->strip;
  for (int64_t t = 1; t < std::min(threads, job->strips); ++t) pool.Schedule([job] { job->Run(); });
  job->Run();
  while (job->done.load(std::memory_order_acquire) < job->strips) {
#if defined(__AVX2__)
    _mm_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_jax_block_matmul, BlockMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
