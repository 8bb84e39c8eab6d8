// nemodiff CUDA kernels: C ABI used by the runtime through ctypes.
//
// checkpoint ──builder (nvcc, per arch)──▶ engine dir/kernels ──runtime (ctypes)──▶ Triton
//
// Every function takes device pointers and a cudaStream_t, launches asynchronously and
// returns the launch status (0 = cudaSuccess). dtype: 0 = float16, 1 = bfloat16.
// Each kernel's PyTorch reference lives in plugins/reference.py.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

extern "C" {

// Version of this ABI; the loader refuses a library whose version differs.
int nd_abi_version();

// Paged segment attention (DESIGN §4). Token t belongs to segment token_seg[t]; segment s
// owns tokens [seg_start[s], seg_start[s+1]), sees its committed prefix of prefix_len[s]
// positions through block_tables[s * max_pages + page] (all visible), then its own fresh keys
// under pattern[s]: 0 causal, 1 full, 2 explicit mask (row-major n_s x n_s bytes at
// masks + mask_offset[s]). q [T, Hq, D]; k_new, v_new [T, Hkv, D]; caches [slots, Hkv, D];
// out [T, Hq, D]. num_splits > 1 splits the keys across blocks (split-KV) and needs a float
// workspace of num_splits * T * Hq * (D + 2) elements. D must be 64 or 128.
int nd_segment_attention(const void* q, const void* k_new, const void* v_new, const void* k_cache,
                         const void* v_cache, void* out, const int32_t* token_seg, const int32_t* seg_start,
                         const int32_t* prefix_len, const int32_t* block_tables, int max_pages, int page_size,
                         const int32_t* pattern, const int64_t* mask_offset, const uint8_t* masks, int num_tokens,
                         int num_q_heads, int num_kv_heads, int head_dim, float scale, int dtype, int num_splits,
                         float* workspace, cudaStream_t stream);

// Row-wise argmax (first index on ties) and its softmax probability over float32 logits [rows, vocab].
int nd_row_argmax_prob(const float* logits, int rows, int vocab, int32_t* argmax, float* prob,
                       cudaStream_t stream);

// Parallel denoising selection for diffusion segments (DESIGN §5.2). Rows [row_start[s],
// row_start[s+1]) are segment s's masked positions (row_pos = their index in the block).
// threshold[s] > 0: unmask rows with prob >= threshold plus the most confident one;
// otherwise unmask the topk[s] most confident. Writes the chosen candidates into
// block_tokens [S, B], clears masked [S, B] and stores the masks left in remaining[S].
int nd_denoise_select(const int32_t* candidates, const float* confidence, const int32_t* row_start,
                      const int32_t* row_pos, const float* threshold, const int32_t* topk, int32_t* block_tokens,
                      uint8_t* masked, int32_t* remaining, int num_segments, int block, cudaStream_t stream);

// Greedy speculative acceptance (DESIGN §5.3/5.4). For segment s, verifier rows
// [row_start[s], row_start[s+1]) hold argmax predictions a_0..a_{m-1}; drafts[s * max_drafts + i]
// holds d_{i+1}. Writes accepted[s] = n, bonus[s] = a_{n-1} (the next seed) and
// new_committed[s] = committed[s] + n.
int nd_spec_accept(const int32_t* target_argmax, const int32_t* row_start, const int32_t* drafts, int max_drafts,
                   const int32_t* committed, int32_t* accepted, int32_t* bonus, int32_t* new_committed,
                   int num_segments, cudaStream_t stream);

// x += delta (when delta is not null), then out = weight * rmsnorm(x) with the norm in float32.
// x, delta, out [T, H]; weight [H].
int nd_add_rmsnorm(void* x, const void* delta, const void* weight, void* out, int num_tokens, int hidden, float eps,
                   int dtype, cudaStream_t stream);

}  // extern "C"
