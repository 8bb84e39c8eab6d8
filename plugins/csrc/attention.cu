// Paged segment attention: committed prefix through page tables + intra-segment pattern.
//
// checkpoint ──builder (nvcc, per arch)──▶ engine dir/kernels ──runtime (ctypes)──▶ Triton
//
// One block of four warps per (query token, query head, key split). Each warp walks a
// strided share of the visible keys with an online softmax in float32; the warps merge in
// shared memory. With several splits the partial results (acc, max, sum) go to a
// workspace and a second kernel merges them (split-KV for long prefixes).
#include "common.cuh"
#include "nemodiff_kernels.h"

namespace nd {

constexpr int kWarps = 4;

struct AttentionArgs {
  const void* q;
  const void* k_new;
  const void* v_new;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* token_seg;
  const int32_t* seg_start;
  const int32_t* prefix_len;
  const int32_t* block_tables;
  int max_pages;
  int page_size;
  const int32_t* pattern;
  const int64_t* mask_offset;
  const uint8_t* masks;
  int num_tokens;
  int num_q_heads;
  int num_kv_heads;
  float scale;
  int num_splits;
  float* workspace;
};

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) segment_attention_kernel(AttentionArgs a) {
  constexpr int kPer = D / 32;
  const int t = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s = a.token_seg[t];
  const int start = a.seg_start[s];
  const int n = a.seg_start[s + 1] - start;
  const int qi = t - start;
  const int prefix = a.prefix_len[s];
  const int pattern = a.pattern[s];
  const int kv_head = h / (a.num_q_heads / a.num_kv_heads);
  const int total = prefix + (pattern == 0 ? qi + 1 : n);
  const int per_split = (total + a.num_splits - 1) / a.num_splits;
  const int k_begin = split * per_split;
  const int k_end = min(total, k_begin + per_split);

  const T* q = static_cast<const T*>(a.q) + (static_cast<int64_t>(t) * a.num_q_heads + h) * D;
  float qv[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    qv[i] = to_float(q[lane * kPer + i]) * a.scale;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const uint8_t* mask = pattern == 2 ? a.masks + a.mask_offset[s] + static_cast<int64_t>(qi) * n : nullptr;

  for (int j = k_begin + warp; j < k_end; j += kWarps) {
    const T* kp;
    const T* vp;
    if (j < prefix) {
      const int64_t page = a.block_tables[static_cast<int64_t>(s) * a.max_pages + j / a.page_size];
      const int64_t slot = page * a.page_size + j % a.page_size;
      const int64_t offset = (slot * a.num_kv_heads + kv_head) * D;
      kp = static_cast<const T*>(a.k_cache) + offset;
      vp = static_cast<const T*>(a.v_cache) + offset;
    } else {
      const int local = j - prefix;
      if (mask != nullptr && !mask[local]) continue;
      const int64_t offset = ((static_cast<int64_t>(start) + local) * a.num_kv_heads + kv_head) * D;
      kp = static_cast<const T*>(a.k_new) + offset;
      vp = static_cast<const T*>(a.v_new) + offset;
    }
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) dot += qv[i] * to_float(kp[lane * kPer + i]);
    dot = warp_sum(dot);
    const float m_new = fmaxf(m, dot);
    const float correction = __expf(m - m_new);
    const float p = __expf(dot - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = acc[i] * correction + p * to_float(vp[lane * kPer + i]);
    m = m_new;
  }

  __shared__ float s_m[kWarps], s_l[kWarps], s_acc[kWarps][D];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) s_acc[warp][lane * kPer + i] = acc[i];
  __syncthreads();

  float m_all = -INFINITY;
  for (int w = 0; w < kWarps; ++w)
    if (s_l[w] > 0.f) m_all = fmaxf(m_all, s_m[w]);
  float l_all = 0.f;
  for (int w = 0; w < kWarps; ++w)
    if (s_l[w] > 0.f) l_all += s_l[w] * __expf(s_m[w] - m_all);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float value = 0.f;
    for (int w = 0; w < kWarps; ++w)
      if (s_l[w] > 0.f) value += s_acc[w][d] * __expf(s_m[w] - m_all);
    if (a.num_splits == 1) {
      T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(t) * a.num_q_heads + h) * D;
      out[d] = from_float<T>(l_all > 0.f ? value / l_all : 0.f);
    } else {
      float* ws = a.workspace + ((static_cast<int64_t>(split) * a.num_tokens + t) * a.num_q_heads + h) * (D + 2);
      ws[d] = value;
      if (d == 0) {
        ws[D] = m_all;
        ws[D + 1] = l_all;
      }
    }
  }
}

template <typename T, int D>
__global__ void merge_splits_kernel(AttentionArgs a) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t stride = static_cast<int64_t>(a.num_tokens) * a.num_q_heads * (D + 2);
  const float* base = a.workspace + (static_cast<int64_t>(t) * a.num_q_heads + h) * (D + 2);
  float m_all = -INFINITY;
  for (int sp = 0; sp < a.num_splits; ++sp)
    if (base[sp * stride + D + 1] > 0.f) m_all = fmaxf(m_all, base[sp * stride + D]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float value = 0.f, l_all = 0.f;
    for (int sp = 0; sp < a.num_splits; ++sp) {
      const float* part = base + sp * stride;
      if (part[D + 1] > 0.f) {
        const float w = __expf(part[D] - m_all);
        value += part[d] * w;
        l_all += part[D + 1] * w;
      }
    }
    T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(t) * a.num_q_heads + h) * D;
    out[d] = from_float<T>(l_all > 0.f ? value / l_all : 0.f);
  }
}

template <typename T, int D>
int launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  dim3 grid(a.num_tokens, a.num_q_heads, a.num_splits);
  segment_attention_kernel<T, D><<<grid, kWarps * 32, 0, stream>>>(a);
  if (a.num_splits > 1) merge_splits_kernel<T, D><<<dim3(a.num_tokens, a.num_q_heads), D, 0, stream>>>(a);
  return launch_status();
}

}  // namespace nd

extern "C" int nd_abi_version() { return 1; }

extern "C" int nd_segment_attention(const void* q, const void* k_new, const void* v_new, const void* k_cache,
                                    const void* v_cache, void* out, const int32_t* token_seg,
                                    const int32_t* seg_start, const int32_t* prefix_len,
                                    const int32_t* block_tables, int max_pages, int page_size,
                                    const int32_t* pattern, const int64_t* mask_offset, const uint8_t* masks,
                                    int num_tokens, int num_q_heads, int num_kv_heads, int head_dim, float scale,
                                    int dtype, int num_splits, float* workspace, cudaStream_t stream) {
  if (num_tokens == 0) return 0;
  if (num_splits < 1 || (num_splits > 1 && workspace == nullptr) || num_q_heads % num_kv_heads != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  nd::AttentionArgs a{q,        k_new,     v_new,       k_cache,  v_cache,    out,         token_seg,
                      seg_start, prefix_len, block_tables, max_pages, page_size, pattern,    mask_offset,
                      masks,    num_tokens, num_q_heads, num_kv_heads, scale,   num_splits, workspace};
  if (head_dim == 128)
    return dtype == 1 ? nd::launch_attention<__nv_bfloat16, 128>(a, stream) : nd::launch_attention<__half, 128>(a, stream);
  if (head_dim == 64)
    return dtype == 1 ? nd::launch_attention<__nv_bfloat16, 64>(a, stream) : nd::launch_attention<__half, 64>(a, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}
