// Structured output, native: the temperature-0 grammar walks of a step, in C++.
//
// checkpoint -> builder -> engine dir -> [runtime: decide > grammar walks (this file)] -> Triton
//
// Each guided request's grammar work of a step is a GuideJob (grammar_jobs.py), which grammar_batch.py
// walks in Python rounds. Where the logits are float32 host memory, grammar_native.py hands the greedy
// jobs (VERIFY, WALK, DIFFUSE at temperature 0) to `walk` below instead: each job walks all its rows and
// its follow-up in one loop over xgrammar's matcher (its methods called through the TVM FFI reflection
// table, the same objects the Python bindings hold), with no Python per row; then its look-ahead is
// rolled back but what the matcher keeps, and its one-token rows are written out (or into the logits).
// The rules are grammar_batch.py's, row for row: a row whose first maximum the grammar takes decides that
// token; a refused row fills its bitmask and takes the masked first maximum (numpy's argmax: the first
// largest entry, a NaN first); a denoising row after the first reveals while its masked, renormalised
// probability (float64) reaches the threshold.
//
// plan: int64 [jobs, kColumns] (read, and written back: kDepth, kSettled, kTaken, kPicks, kState).

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/accessor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>

namespace {

using tvm::ffi::Array;
using tvm::ffi::Function;
using tvm::ffi::ObjectRef;
using tvm::ffi::Tensor;

enum Column : int64_t {
  kKind,        // 1 VERIFY, 2 WALK, 3 DIFFUSE
  kRow,         // logit row of the job's row 0
  kDepth,       // rows walked so far (in), rows walked (out)
  kWalk,        // the most rows walked
  kCount,       // the job's rows (its follow-up's included)
  kBase,        // bitmask / forced / picked row of the job's row 0
  kAfterOff,    // tokens accepted before row 0: ints[kAfterOff : kAfterOff + kAfterLen]
  kAfterLen,
  kDraftOff,    // VERIFY drafts: ints[kDraftOff : kDraftOff + kDraftLen]
  kDraftLen,
  kStopOff,     // tokens that end the grammar: ints[kStopOff : kStopOff + kStopLen]
  kStopLen,
  kTopK,        // DIFFUSE: reveals up to k rows (top-k schedule; tau < 0 in taus)
  kLast,        // DIFFUSE: the block's last step (reveals every walked row)
  kOnly,        // DIFFUSE: the token its unrevealed rows allow (the mask id)
  kThenFirst,   // follow-up (grammar_jobs.py FollowUp; < 0: none): after n >= 1 decided rows, a WALK over
  kThenStride,  //   kThenCount rows from row kThenFirst + (n - 1) * kThenStride, walking at most kThenWalk
  kThenCount,
  kThenWalk,
  kSettled,     // out: `after` tokens accepted (the caller keeps them)
  kTaken,       // out: tokens the walk accepted (all rolled back here but a VERIFY's or DIFFUSE's own picks)
  kPicks,       // out: rows decided (their tokens in picked[kBase + depth_in ...])
  kState,       // out: 0 walked, 1 could not start, 2 failed (xgrammar, or rows outside the job's)
  kColumns
};
constexpr int64_t kKindVerify = 1, kKindWalk = 2, kKindDiffuse = 3;

struct Matcher {
  Function accept, fill, terminated, rollback;
  Matcher()
      : accept(Method("accept_token")),
        fill(Method("fill_next_token_bitmask")),
        terminated(Method("is_terminated")),
        rollback(Method("rollback")) {}
  static Function Method(const char* name) {
    return tvm::ffi::reflection::GetMethod("xgrammar.tvm_ffi_binding.GrammarMatcher", name);
  }
};

const Matcher& Methods() {
  static const Matcher methods;
  return methods;
}

// numpy's argmax of x[0:n]: the first largest entry, the first NaN if there is one. Sixteen lanes in
// four vectors of four (GCC vector extensions: SSE or NEON on any target), each lane keeping its first
// largest entry and whether it saw a NaN; then the smallest index among the lanes' maxima (-0 and +0
// tie, as they do for numpy).
typedef float Floats __attribute__((vector_size(16)));
typedef int32_t Ints __attribute__((vector_size(16)));
constexpr int kVectors = 4, kLanes = 4 * kVectors;

int64_t FirstMax(const float* x, int64_t n) {
  int64_t best = -1, t = 0;
  bool nan = false;
  if (n >= kLanes) {
    Floats top[kVectors];
    Ints at[kVectors], index[kVectors], seen = {0, 0, 0, 0};
    for (int k = 0; k < kVectors; ++k) {
      std::memcpy(&top[k], x + 4 * k, sizeof(Floats));
      for (int i = 0; i < 4; ++i) at[k][i] = 4 * k + i;
      index[k] = at[k];
      seen |= top[k] != top[k];
    }
    for (t = kLanes; t + kLanes <= n; t += kLanes) {
      for (int k = 0; k < kVectors; ++k) {
        Floats v;
        std::memcpy(&v, x + t + 4 * k, sizeof v);
        index[k] += kLanes;
        const Ints up = v > top[k];
        top[k] = reinterpret_cast<Floats>((reinterpret_cast<Ints>(v) & up) | (reinterpret_cast<Ints>(top[k]) & ~up));
        at[k] = (index[k] & up) | (at[k] & ~up);
        seen |= v != v;
      }
    }
    for (int k = 0; k < kVectors; ++k) {
      for (int i = 0; i < 4; ++i) {
        nan |= seen[i] != 0;
        if (best < 0 || top[k][i] > x[best] || (top[k][i] == x[best] && at[k][i] < best)) best = at[k][i];
      }
    }
  }
  for (int64_t u = t; u < n; ++u) {
    nan |= x[u] != x[u];
    if (best < 0 || x[u] > x[best]) best = u;
  }
  if (nan) {
    for (int64_t u = 0; u < n; ++u)
      if (x[u] != x[u]) return u;
  }
  return best < 0 ? 0 : best;
}

// Calls f(t) for each token t < n the bitmask allows, in increasing order.
template <typename F>
void ForAllowed(const uint32_t* mask, int64_t n, F f) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    for (uint32_t bits = mask[w]; bits; bits &= bits - 1) {
      const int64_t t = w * 32 + __builtin_ctz(bits);
      if (t >= n) return;
      f(t);
    }
  }
}

// numpy's argmax of x[0:n] with -inf where the bitmask refuses (the first largest, the first NaN).
int64_t MaskedFirstMax(const float* x, int64_t n, const uint32_t* mask) {
  const float neg = -std::numeric_limits<float>::infinity();
  const bool zero = mask[0] & 1u;
  float best = zero ? x[0] : neg;
  if (best != best) return 0;
  int64_t at = 0, nan = -1;
  ForAllowed(mask, n, [&](int64_t t) {
    if (nan >= 0 || t == 0) return;
    const float v = x[t];
    if (v != v) {
      nan = t;
    } else if (v > best) {
      best = v;
      at = t;
    }
  });
  return nan >= 0 ? nan : at;
}

struct Step {
  const ObjectRef& handle;
  float* logits;
  int64_t vocab;
  const int64_t* ints;
  const uint8_t* never;
  int64_t never_size;
  DLTensor* out;
  int64_t words;
  int64_t* forced;
  int64_t* picked;
  int64_t* plan;
  double tau;  // DIFFUSE: < 0 for the top-k schedule; NaN when not a denoising job

  bool Stops(int64_t token) const {
    const int64_t* s = ints + plan[kStopOff];
    for (int64_t i = 0; i < plan[kStopLen]; ++i)
      if (s[i] == token) return true;
    return false;
  }

  bool Accept(int64_t token) const {
    if (!Methods().accept(handle, token, false).cast<bool>()) return false;
    ++plan[kTaken];
    return true;
  }

  // _start of grammar_batch.py: the `after` tokens; false when one is refused or the grammar ended.
  bool Start() const {
    if (Methods().terminated(handle).cast<bool>()) return false;
    const int64_t* after = ints + plan[kAfterOff];
    for (int64_t i = 0; i < plan[kAfterLen]; ++i) {
      const int64_t token = after[i];
      if (token < 0 || token >= never_size || never[token] || !Methods().accept(handle, token, false).cast<bool>())
        return false;
      ++plan[kSettled];
      if (Stops(token)) return false;
    }
    return true;
  }

  // Whether the walk goes on after row j decided `token` (accepted): not the grammar's end, and for a
  // verification not the first row that did not choose its draft (that row's token is the bonus).
  bool GoesOn(int64_t j, int64_t token) const {
    if (Stops(token)) return false;
    if (plan[kKind] != kKindVerify) return true;
    return j < plan[kDraftLen] && token == ints[plan[kDraftOff] + j];
  }

  void Decided(int64_t j, int64_t token) const {
    picked[plan[kBase] + j] = token;
    ++plan[kPicks];
    plan[kDepth] = j + 1;
  }

  // The masked row j: its first maximum, and (a denoising row after the first) whether it is revealed.
  bool Masked(int64_t j, bool confidence, int64_t* token) const {
    const int64_t at = plan[kBase] + j;
    Methods().fill(handle, out, at, false);
    const uint32_t* mask = static_cast<const uint32_t*>(out->data) + at * words;
    const float* x = logits + (plan[kRow] + j) * vocab;
    *token = MaskedFirstMax(x, vocab, mask);
    if (!confidence) return true;
    const double top = x[*token];
    double total = 0.0;
    ForAllowed(mask, vocab, [&](int64_t t) { total += std::exp(static_cast<double>(x[t]) - top); });
    return 1.0 / total >= tau;
  }

  // After the walk: the look-ahead rolled back but the tokens a verification's or denoising step's own rows
  // decided (the caller keeps them accepted); a denoising step's rows each allowing its revealed token or
  // the mask id; a failed job's rows allowing everything.
  void Finish() const {
    const bool keep = plan[kState] == 0 && (plan[kKind] == kKindVerify || plan[kKind] == kKindDiffuse);
    const int64_t undo = plan[kTaken] - (keep ? plan[kPicks] : 0);
    try {
      if (undo > 0) Methods().rollback(handle, undo);
    } catch (const std::exception&) {
      plan[kState] = 2;
    }
    int64_t* rows = forced + plan[kBase];
    if (plan[kState] == 2) {
      std::fill(rows, rows + plan[kCount], int64_t{-1});
    } else if (plan[kKind] == kKindDiffuse && plan[kPicks] > 0) {
      std::copy(picked + plan[kBase], picked + plan[kBase] + plan[kPicks], rows);
      std::fill(rows + plan[kPicks], rows + plan[kCount], plan[kOnly]);
    }
  }

  // grammar.py's apply_only on the job's logit rows: each row that allows one token keeps that logit alone
  // (and is no longer listed in forced).
  void Apply() const {
    const float neg = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < plan[kCount]; ++j) {
      const int64_t token = forced[plan[kBase] + j];
      if (token < 0 || token >= vocab) continue;
      forced[plan[kBase] + j] = -1;
      float* x = logits + (plan[kRow] + j) * vocab;
      const float kept = x[token];
      std::fill(x, x + vocab, neg);
      x[token] = kept;
    }
  }

  void Walk() const {
    const bool diffuse = plan[kKind] == kKindDiffuse;
    const bool last = plan[kLast] != 0;
    const bool by_confidence = diffuse && tau >= 0 && !last;
    for (int64_t j = plan[kDepth]; j < plan[kWalk]; ++j) {
      const bool later = diffuse && j > 0 && !last;
      if (later && !by_confidence && j >= plan[kTopK]) return;  // the top-k schedule reveals no more
      const bool confidence = later && by_confidence;  // decided by the masked row, never by try-accept
      if (!confidence) {
        const float* x = logits + (plan[kRow] + j) * vocab;
        const int64_t greedy = FirstMax(x, vocab);
        if (greedy < never_size && !never[greedy] && Accept(greedy)) {
          Decided(j, greedy);
          if (!GoesOn(j, greedy)) return;
          continue;
        }
      }
      int64_t token;
      if (!Masked(j, confidence, &token)) return;  // not confident: stays masked
      if (!diffuse) forced[plan[kBase] + j] = token;
      if (!Accept(token)) return;
      Decided(j, token);
      if (!GoesOn(j, token)) return;
    }
  }
};

// Whether every row a job (and its follow-up) may touch lies inside its own rows, and those inside the
// arrays: a job that would reach outside fails alone, before it accepts any token.
bool Inside(const int64_t* p, int64_t ints, int64_t logit_rows, int64_t rows) {
  int64_t reach = p[kWalk];
  if (p[kThenFirst] >= 0) reach = std::max(reach, p[kThenFirst] + (p[kWalk] - 1) * p[kThenStride] + p[kThenCount]);
  const bool lists = p[kAfterOff] >= 0 && p[kAfterOff] + p[kAfterLen] <= ints && p[kDraftOff] >= 0 &&
                     p[kDraftOff] + p[kDraftLen] <= ints && p[kStopOff] >= 0 && p[kStopOff] + p[kStopLen] <= ints;
  return lists && reach <= p[kCount] && p[kRow] >= 0 && p[kBase] >= 0 && p[kDepth] >= 0 &&
         p[kRow] + p[kCount] <= logit_rows && p[kBase] + p[kCount] <= rows;
}

// Walk every job of the plan (see the column list above). handles[i]: job i's GrammarMatcher; logits:
// float32 [rows, vocab] on the host; ints: the plan's token lists; taus: float64 per job (DIFFUSE: its
// threshold, < 0 for the top-k schedule); never: uint8 [grammar vocabulary], tokens no grammar takes;
// out: int32 bitmask rows (refused rows' masks are filled there); forced, picked: int64 per bitmask row;
// apply: leave each one-token row of the logits that logit alone, in place (the caller keeps no originals).
void WalkJobs(Array<ObjectRef> handles, Tensor plan, Tensor ints, Tensor taus, Tensor never, Tensor logits, Tensor out,
              Tensor forced, Tensor picked, bool apply) {
  DLTensor* out_view = const_cast<DLTensor*>(out.GetDLTensorPtr());
  const int64_t jobs = plan.shape()[0];
  if (plan.ndim() != 2 || plan.shape()[1] != kColumns || static_cast<int64_t>(handles.size()) != jobs ||
      taus.shape()[0] != jobs || never.ndim() != 1 || logits.ndim() != 2 || out.ndim() != 2)
    TVM_FFI_THROW(ValueError) << "grammar walk: a plan of " << kColumns << " columns, one matcher and tau per job";
  const int64_t rows = std::min({out.shape()[0], forced.shape()[0], picked.shape()[0]});
  for (int64_t i = 0; i < jobs; ++i) {
    int64_t* row = static_cast<int64_t*>(plan.data_ptr()) + i * kColumns;
    const ObjectRef& handle = handles[i];
    Step step{handle,
              static_cast<float*>(logits.data_ptr()),
              logits.shape()[1],
              static_cast<const int64_t*>(ints.data_ptr()),
              static_cast<const uint8_t*>(never.data_ptr()),
              never.shape()[0],
              out_view,
              out.shape()[1],
              static_cast<int64_t*>(forced.data_ptr()),
              static_cast<int64_t*>(picked.data_ptr()),
              row,
              static_cast<const double*>(taus.data_ptr())[i]};
    row[kSettled] = row[kTaken] = row[kPicks] = row[kState] = 0;
    if (!Inside(row, ints.shape()[0], logits.shape()[0], rows)) {
      row[kState] = 2;  // its rows, maybe another job's: left as they are
      continue;
    }
    try {
      if (!step.Start()) row[kState] = 1;
      if (row[kState] == 0) step.Walk();
      if (row[kState] == 0 && row[kThenFirst] >= 0 && row[kPicks] > 0 && !Methods().terminated(handle).cast<bool>()) {
        int64_t child[kColumns];
        std::copy(row, row + kColumns, child);
        const int64_t offset = row[kThenFirst] + (row[kPicks] - 1) * row[kThenStride];
        child[kKind] = kKindWalk;
        child[kRow] += offset;
        child[kBase] += offset;
        child[kDepth] = child[kAfterLen] = child[kDraftLen] = child[kTaken] = child[kPicks] = 0;
        child[kWalk] = std::min(row[kThenWalk], row[kThenCount]);
        Step next = step;
        next.plan = child;
        next.Walk();
        row[kTaken] += child[kTaken];
      }
    } catch (const std::exception&) {
      row[kState] = 2;
    }
    step.Finish();
    if (apply) step.Apply();
  }
}

int64_t Columns() { return kColumns; }

// Looks up the matcher methods the walk calls (throws where this xgrammar lacks one).
bool Ready() {
  Methods();
  return true;
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(walk, WalkJobs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(columns, Columns);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(ready, Ready);
