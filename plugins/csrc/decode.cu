// Decode-side kernels: row argmax + probability, parallel denoising selection, speculative
// acceptance. They keep the per-step decisions on the device (no host synchronisation).
//
// checkpoint ──builder (nvcc, per arch)──▶ engine dir/kernels ──runtime (ctypes)──▶ Triton
#include "common.cuh"
#include "nemodiff_kernels.h"

namespace nd {

constexpr int kRowThreads = 256;

__global__ void __launch_bounds__(kRowThreads) row_argmax_prob_kernel(const float* logits, int vocab,
                                                                      int32_t* argmax, float* prob) {
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  float best = -INFINITY;
  int best_idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = row[i];
    if (v > best || (v == best && i < best_idx)) {
      best = v;
      best_idx = i;
    }
  }
  __shared__ float s_val[kRowThreads];
  __shared__ int s_idx[kRowThreads];
  s_val[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_idx;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float v = s_val[threadIdx.x + stride];
      const int idx = s_idx[threadIdx.x + stride];
      if (v > s_val[threadIdx.x] || (v == s_val[threadIdx.x] && idx < s_idx[threadIdx.x])) {
        s_val[threadIdx.x] = v;
        s_idx[threadIdx.x] = idx;
      }
    }
    __syncthreads();
  }
  const float row_max = s_val[0];
  const int row_arg = s_idx[0];
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += __expf(row[i] - row_max);
  s_val[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s_val[threadIdx.x] += s_val[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    argmax[blockIdx.x] = row_arg;
    prob[blockIdx.x] = 1.f / s_val[0];
  }
}

// One thread per segment: blocks are short (B <= a few dozen), so a serial pass is cheapest.
__global__ void denoise_select_kernel(const int32_t* candidates, const float* confidence, const int32_t* row_start,
                                      const int32_t* row_pos, const float* threshold, const int32_t* topk,
                                      int32_t* block_tokens, uint8_t* masked, int32_t* remaining, int num_segments,
                                      int block) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= num_segments) return;
  const int r0 = row_start[s], r1 = row_start[s + 1];
  int best = r0;
  for (int r = r0 + 1; r < r1; ++r)
    if (confidence[r] > confidence[best]) best = r;
  const float tau = threshold[s];
  const int k = topk[s];
  for (int r = r0; r < r1; ++r) {
    bool chosen;
    if (tau > 0.f) {
      chosen = confidence[r] >= tau || r == best;
    } else {
      int rank = 0;  // rows strictly more confident, ties broken by the lower row
      for (int o = r0; o < r1; ++o)
        rank += confidence[o] > confidence[r] || (confidence[o] == confidence[r] && o < r);
      chosen = rank < k;
    }
    if (chosen) {
      const int64_t cell = static_cast<int64_t>(s) * block + row_pos[r];
      block_tokens[cell] = candidates[r];
      masked[cell] = 0;
    }
  }
  int left = 0;
  for (int j = 0; j < block; ++j) left += masked[static_cast<int64_t>(s) * block + j] != 0;
  remaining[s] = left;
}

__global__ void spec_accept_kernel(const int32_t* target_argmax, const int32_t* row_start, const int32_t* drafts,
                                   int max_drafts, const int32_t* committed, int32_t* accepted, int32_t* bonus,
                                   int32_t* new_committed, int num_segments) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= num_segments) return;
  const int r0 = row_start[s], m = row_start[s + 1] - r0;
  int n = 1;
  while (n < m && target_argmax[r0 + n - 1] == drafts[static_cast<int64_t>(s) * max_drafts + n - 1]) ++n;
  accepted[s] = n;
  bonus[s] = target_argmax[r0 + n - 1];
  new_committed[s] = committed[s] + n;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) add_rmsnorm_kernel(T* x, const T* delta, const T* weight, T* out,
                                                                  int hidden, float eps) {
  T* row = x + static_cast<int64_t>(blockIdx.x) * hidden;
  const T* drow = delta ? delta + static_cast<int64_t>(blockIdx.x) * hidden : nullptr;
  float sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(row[i]);
    if (drow) {
      row[i] = from_float<T>(v + to_float(drow[i]));  // rounded like a framework add
      v = to_float(row[i]);
    }
    sq += v * v;
  }
  __shared__ float s_sum[kRowThreads];
  s_sum[threadIdx.x] = sq;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s_sum[threadIdx.x] += s_sum[threadIdx.x + stride];
    __syncthreads();
  }
  const float inv = rsqrtf(s_sum[0] / hidden + eps);
  T* orow = out + static_cast<int64_t>(blockIdx.x) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T normed = from_float<T>(to_float(row[i]) * inv);
    orow[i] = from_float<T>(to_float(weight[i]) * to_float(normed));
  }
}

}  // namespace nd

extern "C" int nd_row_argmax_prob(const float* logits, int rows, int vocab, int32_t* argmax, float* prob,
                                  cudaStream_t stream) {
  if (rows == 0) return 0;
  nd::row_argmax_prob_kernel<<<rows, nd::kRowThreads, 0, stream>>>(logits, vocab, argmax, prob);
  return nd::launch_status();
}

extern "C" int nd_denoise_select(const int32_t* candidates, const float* confidence, const int32_t* row_start,
                                 const int32_t* row_pos, const float* threshold, const int32_t* topk,
                                 int32_t* block_tokens, uint8_t* masked, int32_t* remaining, int num_segments,
                                 int block, cudaStream_t stream) {
  if (num_segments == 0) return 0;
  const int threads = 128, blocks = (num_segments + threads - 1) / threads;
  nd::denoise_select_kernel<<<blocks, threads, 0, stream>>>(candidates, confidence, row_start, row_pos, threshold,
                                                            topk, block_tokens, masked, remaining, num_segments,
                                                            block);
  return nd::launch_status();
}

extern "C" int nd_spec_accept(const int32_t* target_argmax, const int32_t* row_start, const int32_t* drafts,
                              int max_drafts, const int32_t* committed, int32_t* accepted, int32_t* bonus,
                              int32_t* new_committed, int num_segments, cudaStream_t stream) {
  if (num_segments == 0) return 0;
  const int threads = 128, blocks = (num_segments + threads - 1) / threads;
  nd::spec_accept_kernel<<<blocks, threads, 0, stream>>>(target_argmax, row_start, drafts, max_drafts, committed,
                                                         accepted, bonus, new_committed, num_segments);
  return nd::launch_status();
}

extern "C" int nd_add_rmsnorm(void* x, const void* delta, const void* weight, void* out, int num_tokens, int hidden,
                              float eps, int dtype, cudaStream_t stream) {
  if (num_tokens == 0) return 0;
  if (dtype == 1) {
    nd::add_rmsnorm_kernel<__nv_bfloat16><<<num_tokens, nd::kRowThreads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(delta),
        static_cast<const __nv_bfloat16*>(weight), static_cast<__nv_bfloat16*>(out), hidden, eps);
  } else {
    nd::add_rmsnorm_kernel<__half><<<num_tokens, nd::kRowThreads, 0, stream>>>(
        static_cast<__half*>(x), static_cast<const __half*>(delta), static_cast<const __half*>(weight),
        static_cast<__half*>(out), hidden, eps);
  }
  return nd::launch_status();
}
