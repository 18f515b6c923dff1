#ifndef FAVOR_H
#define FAVOR_H

/* Generated from favor-capi/src by cbindgen; do not edit (FAVOR_BLESS=1 cargo test -p favor-capi --test header rewrites it). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// The version of this ABI: bumped whenever a signature or a struct changes.
#define FAVOR_ABI_VERSION 1

// What a favor call returns. `FAVOR_STATUS_OK` is 0; every other value is an error, and
// `favor_last_error()` then names the argument and the problem.
typedef enum FavorStatus {
  // Success.
  FAVOR_STATUS_OK = 0,
  // A tensor has the wrong number of elements for the problem.
  FAVOR_STATUS_SHAPE = 1,
  // A tensor's strides overlap or run past its buffer, or output buffers overlap.
  FAVOR_STATUS_STRIDES = 2,
  // A tensor's element type differs from the call's (taken from q), or is unknown.
  FAVOR_STATUS_DTYPE = 3,
  // A size that must be positive is zero.
  FAVOR_STATUS_ZERO_SIZE = 4,
  // Sizes whose element counts overflow the address space.
  FAVOR_STATUS_SIZE_OVERFLOW = 5,
  // A buffer could not be allocated.
  FAVOR_STATUS_OUT_OF_MEMORY = 6,
  // An element range past the end of a tensor.
  FAVOR_STATUS_OUT_OF_RANGE = 7,
  // A decoding state or slot made for another problem.
  FAVOR_STATUS_STATE_MISMATCH = 8,
  // A parameter outside its valid range (including unknown enum values).
  FAVOR_STATUS_INVALID_PARAMETER = 9,
  // An input holds a NaN or an infinity.
  FAVOR_STATUS_NON_FINITE = 10,
  // A valid request this backend does not support.
  FAVOR_STATUS_UNSUPPORTED = 11,
  // The backend cannot run here (no GPU, no driver, ISA missing).
  FAVOR_STATUS_NOT_AVAILABLE = 12,
  // A failure inside a backend (driver error, launch failure).
  FAVOR_STATUS_BACKEND = 13,
  // A required pointer is null.
  FAVOR_STATUS_NULL_POINTER = 14,
  // A handle of another kind (a map where a backend belongs, say) or not a live handle.
  FAVOR_STATUS_WRONG_HANDLE = 15,
  // An output buffer is too small; the size needed was written where the call says.
  FAVOR_STATUS_BUFFER_TOO_SMALL = 16,
  // An internal error (a bug in favor) was caught before it could reach the caller.
  FAVOR_STATUS_INTERNAL = 17,
} FavorStatus;

// Element types of a tensor.
typedef enum FavorDType {
  // IEEE binary32.
  FAVOR_D_TYPE_F32 = 0,
  // IEEE binary16.
  FAVOR_D_TYPE_F16 = 1,
  // bfloat16.
  FAVOR_D_TYPE_BF16 = 2,
} FavorDType;

// Feature maps with a random projection W (`FavorMapConfig::kind`).
typedef enum FavorMapKind {
  // FAVOR+ positive softmax features m^{-1/2}(exp(Wx̃ − ‖x̃‖²/2) + ε·(the token's largest
  // feature)), x̃ = √τ·x (m features).
  FAVOR_MAP_KIND_POSITIVE = 0,
  // Hyperbolic positive softmax features (2m features from m rows of W).
  FAVOR_MAP_KIND_HYPERBOLIC = 1,
  // Trigonometric (random Fourier) softmax features (2m).
  FAVOR_MAP_KIND_TRIGONOMETRIC = 2,
  // Performer-ReLU: ReLU(Wx/√m) + 0.001 (m features).
  FAVOR_MAP_KIND_RELU = 3,
  // ELU(x) + 1 without a projection (d features; m, seed and iid are ignored).
  FAVOR_MAP_KIND_ELU_PLUS_ONE = 4,
} FavorMapKind;

// Which stabiliser the feature map gives a batch of tokens.
typedef enum FavorRole {
  // Per-token stabiliser (queries).
  FAVOR_ROLE_QUERY = 0,
  // One stabiliser per (batch, head): the maximum over its tokens (bidirectional keys).
  FAVOR_ROLE_KEY = 1,
  // Running maximum along the sequence (causal keys).
  FAVOR_ROLE_CAUSAL_KEY = 2,
} FavorRole;

// A backend (C: `FavorBackend *`). Thread-safe: any number of threads may call through one
// backend handle at once.
typedef struct FavorBackend FavorBackend;

// A prepared feature map (C: `FavorMap *`): its projection or parameters, immutable after
// creation, so it may be shared by any number of threads. Backends keep W in their own prepared
// form (scales folded in, padded) across calls, keyed by the map.
typedef struct FavorMap FavorMap;

// A decoding state of many slots (C: `FavorState *`), tied to the backend that created it.
// Calls on one state from several threads are serialised by a lock inside it.
typedef struct FavorState FavorState;

// Sizes and options of an attention call.
typedef struct FavorProblem {
  // Batch size (the number of slots for a decoding state).
  size_t batch;
  // Query heads per batch element.
  size_t heads;
  // Query tokens per sequence (the chunk length when decoding).
  size_t len;
  // Query/key head dimension.
  size_t d;
  // Value head dimension; 0 means d.
  size_t dv;
  // Keys per sequence (cross-attention, bidirectional only); 0 means len.
  size_t kv_len;
  // Key/value heads per batch element (grouped-query attention; must divide heads); 0 means
  // heads.
  size_t kv_heads;
  // 0: bidirectional, 1: causal.
  int32_t causal;
  // Denominator guard δ; negative selects the feature map's default.
  float denominator_guard;
} FavorProblem;

// A strided tensor in host memory: `len` elements of `dtype` from `data`, read as
// `[batch, heads, rows, width]` with the given strides (in elements; the last dimension is
// contiguous), or device memory for a backend opened with `favor_backend_open_device`. All
// three strides 0 means contiguous `[batch, heads, rows, width]`; a tensor of
// `[batch, rows, heads, width]` has strides (rows·heads·width, width, heads·width), and a packed
// `[batch, rows, 3, heads, d]` QKV buffer gives q, k and v the same buffer at element offsets
// 0, heads·d and 2·heads·d with strides (rows·3·heads·d, d, 3·heads·d) (its `len` counts from
// each tensor's own start).
typedef struct FavorTensor {
  // First element; must be aligned to the element size.
  void *data;
  // Elements addressable from `data`.
  size_t len;
  // A `FavorDType` value.
  int32_t dtype;
  // Elements between batch elements (0 with the other two 0: contiguous).
  size_t batch_stride;
  // Elements between heads.
  size_t head_stride;
  // Elements between tokens (rows).
  size_t token_stride;
} FavorTensor;

// Q, K, V and the optional key padding mask of a call.
typedef struct FavorInputs {
  // Queries `[batch, heads, len, d]`.
  struct FavorTensor q;
  // Keys `[batch, kv_heads, kv_len, d]`.
  struct FavorTensor k;
  // Values `[batch, kv_heads, kv_len, dv]`.
  struct FavorTensor v;
  // Key padding mask `[batch, kv_len]`, nonzero = keep; null for none.
  const uint8_t *key_mask;
  // Bytes of `key_mask` (ignored when it is null).
  size_t key_mask_len;
} FavorInputs;

// The gradient outputs of a backward call (same shapes as q, k and v).
typedef struct FavorGrads {
  // ∂L/∂Q.
  struct FavorTensor dq;
  // ∂L/∂K.
  struct FavorTensor dk;
  // ∂L/∂V.
  struct FavorTensor dv;
} FavorGrads;

// Where a backward call writes the gradients of a learned map's parameters (Softplus, gated
// Softplus); same layouts as the parameters. Ignored for maps without parameters.
typedef struct FavorParamGrads {
  // ∂L/∂W (∂L/∂W_f for the gated map), m·d floats.
  float *dw;
  // Floats at `dw`.
  size_t dw_len;
  // ∂L/∂b (m floats) for maps with a bias; null otherwise.
  float *dbias;
  // Floats at `dbias`.
  size_t dbias_len;
  // ∂L/∂W_g (m·d floats) for the gated map; null otherwise.
  float *dw_gate;
  // Floats at `dw_gate`.
  size_t dw_gate_len;
} FavorParamGrads;

// A ragged batch: sequences packed back to back (batch 1, `len` = all their query tokens),
// `offsets[i]..offsets[i + 1]` the query tokens of sequence i (FlashAttention's `cu_seqlens`).
typedef struct FavorRagged {
  // Cumulative query offsets, starting at 0 and ending at `len`.
  const size_t *offsets;
  // Entries of `offsets` (sequences + 1).
  size_t n_offsets;
  // Cumulative key offsets for cross-attention (ending at `kv_len`); null: the query offsets.
  const size_t *kv_offsets;
  // Entries of `kv_offsets`.
  size_t n_kv_offsets;
} FavorRagged;

// A feature map to draw or build.
typedef struct FavorMapConfig {
  // A `FavorMapKind` value.
  int32_t kind;
  // Rows of W (random features drawn).
  size_t m;
  // Head dimension d (columns of W).
  size_t d;
  // Seed of the random projection.
  uint64_t seed;
  // 0: block-orthogonal rows with χ(d) norms (the FAVOR+ default); 1: iid Gaussian rows.
  int32_t iid;
  // Softmax scale τ (the map estimates exp(τ·qᵀk)); 0 means 1/√d. Exponential maps only.
  float softmax_scale;
  // ε added after the exp of the positive and hyperbolic maps, negative for the default 1e-6;
  // 0 or negative for the other maps, which have no ε.
  float epsilon;
} FavorMapConfig;

// Which tokens of a `favor_decode_slots` call continue which slot: sequence i is tokens
// `offsets[i]..offsets[i + 1]` of the packed tensors (batch 1) and continues slot `slots[i]`.
typedef struct FavorSlotChunks {
  // The slot each sequence continues; no slot twice.
  const size_t *slots;
  // Entries of `slots`.
  size_t n_slots;
  // Cumulative token offsets, `n_slots + 1` entries from 0 to the problem's `len`.
  const size_t *offsets;
  // Entries of `offsets`.
  size_t n_offsets;
} FavorSlotChunks;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The ABI version the library was built with (compare with `FAVOR_ABI_VERSION` from the
// header the program was compiled against).
uint32_t favor_abi_version(void);

// Opens a backend by id: "best" (the GPU when one works, else the widest SIMD ISA), "cuda",
// "cuda:N", "simd", "simd:avx512", "simd:avx2", "simd:portable" or "reference" (the f64
// oracle). `NOT_AVAILABLE` when this machine cannot run it, with the reason.
//
// # Safety
// `id` null or a NUL-terminated string; `out` null or writable.
enum FavorStatus favor_backend_open(const char *id, struct FavorBackend **out);

// Opens the CUDA backend for **device** tensors: every call through the handle takes device
// pointers of this device (in `FavorTensor::data`; key masks, offsets and parameter gradients
// stay in host memory) and enqueues its work on `stream` without a host round trip or a host
// synchronisation of the call's work (`favor_backend_synchronize` waits for it). `id` is
// "cuda" or "cuda:N"; `stream` is the caller's `CUstream` / `cudaStream_t` on the device's
// primary context (the runtime API's context), or null for favor's own stream of the device.
// Decoding states made with the handle live in device memory. `NOT_AVAILABLE` without a GPU.
//
// # Safety
// `id` null or NUL-terminated; `stream` null or a live stream of that device's primary context
// that outlives the handle and its calls' work; `out` null or writable.
enum FavorStatus favor_backend_open_device(const char *id, void *stream, struct FavorBackend **out);

// Writes whether the backend takes device pointers (opened with `favor_backend_open_device`).
//
// # Safety
// `backend` null or live; `device` null or writable.
enum FavorStatus favor_backend_takes_device_pointers(const struct FavorBackend *backend,
                                                     bool *device);

// The ids of every backend available here, fastest first, separated by commas
// ("simd:avx512,simd:avx2,simd:portable,reference"), NUL-terminated into `buf` (`cap` bytes).
// `*needed` gets the size with the NUL; `BUFFER_TOO_SMALL` when it does not fit (call with a
// null `buf` to ask for the size).
//
// # Safety
// `buf` null or valid for `cap` bytes; `needed` null or writable.
enum FavorStatus favor_backends_available(char *buf, size_t cap, size_t *needed);

// The backend's id, which `favor_backend_open` opens again ("simd:avx512", "cuda:0", ...);
// written like `favor_backends_available`.
//
// # Safety
// `backend` null or live; `buf` null or valid for `cap` bytes; `needed` null or writable.
enum FavorStatus favor_backend_id(const struct FavorBackend *backend,
                                  char *buf,
                                  size_t cap,
                                  size_t *needed);

// The backend's descriptive name ("cpu-avx512", "reference", the GPU's name), written like
// `favor_backends_available`.
//
// # Safety
// As `favor_backend_id`.
enum FavorStatus favor_backend_name(const struct FavorBackend *backend,
                                    char *buf,
                                    size_t cap,
                                    size_t *needed);

// Writes whether the backend runs on a GPU.
//
// # Safety
// `backend` null or live; `is_gpu` null or writable.
enum FavorStatus favor_backend_is_gpu(const struct FavorBackend *backend, bool *is_gpu);

// Waits for the backend's queued work (a no-op on CPU backends, whose calls return when done).
//
// # Safety
// `backend` null or live.
enum FavorStatus favor_backend_synchronize(const struct FavorBackend *backend);

// Frees a backend handle (null is a no-op). States made from it keep their own reference.
//
// # Safety
// `backend` null or live, and not used again.
enum FavorStatus favor_backend_free(struct FavorBackend *backend);

// Attention forward: out `[batch, heads, len, dv]` (any strides) from Q, K, V. Causal or
// bidirectional, grouped heads, cross-attention and the softmax scale come from `problem` and
// the map.
//
// # Safety
// Every pointer null or valid (handles live; tensors valid for their `len` elements, the output
// writable and accessed by nothing else during the call; device memory on a device backend).
enum FavorStatus favor_forward(const struct FavorBackend *backend,
                               const struct FavorMap *map,
                               const struct FavorProblem *problem_,
                               const struct FavorInputs *inputs,
                               const struct FavorTensor *out);

// Attention backward: dq, dk, dv (any strides) from Q, K, V and ∂L/∂out, and the learned
// map's parameter gradients into `param_grads` (host memory; null: not wanted).
//
// # Safety
// As `favor_forward`; the gradient buffers writable and disjoint from every other buffer.
enum FavorStatus favor_backward(const struct FavorBackend *backend,
                                const struct FavorMap *map,
                                const struct FavorProblem *problem_,
                                const struct FavorInputs *inputs,
                                const struct FavorTensor *dout,
                                const struct FavorGrads *grads,
                                const struct FavorParamGrads *param_grads);

// Forward over a ragged batch (`problem.batch` = 1, `problem.len` = all query tokens): each
// sequence attends only to its own keys; no work is spent on padding.
//
// # Safety
// As `favor_forward`; `ragged` null or readable with its (host) arrays valid.
enum FavorStatus favor_forward_ragged(const struct FavorBackend *backend,
                                      const struct FavorMap *map,
                                      const struct FavorProblem *problem_,
                                      const struct FavorRagged *ragged,
                                      const struct FavorInputs *inputs,
                                      const struct FavorTensor *out);

// Backward of `favor_forward_ragged`; parameter gradients summed over the sequences.
//
// # Safety
// As `favor_backward` and `favor_forward_ragged`.
enum FavorStatus favor_backward_ragged(const struct FavorBackend *backend,
                                       const struct FavorMap *map,
                                       const struct FavorProblem *problem_,
                                       const struct FavorRagged *ragged,
                                       const struct FavorInputs *inputs,
                                       const struct FavorTensor *dout,
                                       const struct FavorGrads *grads,
                                       const struct FavorParamGrads *param_grads);

// The feature map alone: φ(x) `[batch, heads, len, M]` from x `[batch, heads, len, d]`
// (contiguous; sizes from `problem`'s batch, heads, len and d).
//
// # Safety
// As `favor_forward`.
enum FavorStatus favor_feature_map(const struct FavorBackend *backend,
                                   const struct FavorMap *map,
                                   int32_t role,
                                   const struct FavorProblem *problem_,
                                   const struct FavorTensor *x,
                                   const struct FavorTensor *phi);

// Backward of the feature map: dx from x and ∂L/∂φ, and the learned map's parameter gradients
// into `param_grads` (host memory; null: not wanted).
//
// # Safety
// As `favor_backward`.
enum FavorStatus favor_feature_map_backward(const struct FavorBackend *backend,
                                            const struct FavorMap *map,
                                            int32_t role,
                                            const struct FavorProblem *problem_,
                                            const struct FavorTensor *x,
                                            const struct FavorTensor *dphi,
                                            const struct FavorTensor *dx,
                                            const struct FavorParamGrads *param_grads);

// Draws a feature map: W (m×d) from `config.seed`, block-orthogonal unless `config.iid`.
// The same seed and sizes give the same W as favor's Rust API (`ProjectionConfig`).
//
// # Safety
// `config` is null or valid for one read; `out` is null or valid for one write.
enum FavorStatus favor_map_draw(const struct FavorMapConfig *config, struct FavorMap **out);

// A feature map on the caller's W (row-major m×d floats, `w_len` of them; copied), e.g. one
// drawn by another framework. `config.seed` and `config.iid` are ignored.
//
// # Safety
// `config` null or readable; `w` null or valid for `w_len` floats; `out` null or writable.
enum FavorStatus favor_map_from_matrix(const struct FavorMapConfig *config,
                                       const float *w,
                                       size_t w_len,
                                       struct FavorMap **out);

// A learned map φ(x) = softplus(Wx + b): W row-major m×d (`w_len` floats), b of m floats or
// null for none. The parameters are copied; backward calls return their gradients.
//
// # Safety
// `w` null or valid for `w_len` floats; `bias` null or valid for `bias_len` floats; `out` null
// or writable.
enum FavorStatus favor_map_softplus(size_t m,
                                    size_t d,
                                    const float *w,
                                    size_t w_len,
                                    const float *bias,
                                    size_t bias_len,
                                    struct FavorMap **out);

// A learned gated map φ(x) = softplus(W_f x) ⊙ σ(W_g x): W_f and W_g row-major m×d (`w_len`
// floats each; copied).
//
// # Safety
// Each pointer null or valid for its length in floats; `out` null or writable.
enum FavorStatus favor_map_gated_softplus(size_t m,
                                          size_t d,
                                          const float *w_filter,
                                          const float *w_gate,
                                          size_t w_len,
                                          struct FavorMap **out);

// The number of features M the map produces for head dimension `d` (m, 2m or d).
//
// # Safety
// `map` null or a live handle; `features` null or writable.
enum FavorStatus favor_map_features(const struct FavorMap *map, size_t d, size_t *features);

// Copies the map's W (row-major m×d; W_f for the gated map) into `w` (capacity `cap` floats)
// and writes m and d; `BUFFER_TOO_SMALL` (with m and d written) when `cap < m·d`, and
// `UNSUPPORTED` for maps without a matrix (ELU+1).
//
// # Safety
// `map` null or live; `w` null or valid for `cap` floats; `m`, `d` null or writable.
enum FavorStatus favor_map_matrix(const struct FavorMap *map,
                                  float *w,
                                  size_t cap,
                                  size_t *m,
                                  size_t *d);

// Frees a map (null is a no-op). States and calls do not keep the map.
//
// # Safety
// `map` null or live, and not used again.
enum FavorStatus favor_map_free(struct FavorMap *map);

// An empty decoding state of `problem.batch` slots for `problem`'s heads, sizes and `map`
// (`problem.len` is ignored); it keeps its own reference to `backend` (and lives in device
// memory on a device backend).
//
// # Safety
// Handles null or live; `problem_` null or readable; `out` null or writable.
enum FavorStatus favor_state_new(const struct FavorBackend *backend,
                                 const struct FavorMap *map,
                                 const struct FavorProblem *problem_,
                                 struct FavorState **out);

// Causal attention continuing every slot by the same chunk of `problem.len` tokens
// (`problem.batch` = the state's slots): prefill with a long chunk, decode with one token.
// Equal to full causal attention over all the chunks each slot has consumed.
//
// # Safety
// As `favor_forward`.
enum FavorStatus favor_decode(const struct FavorState *state,
                              const struct FavorMap *map,
                              const struct FavorProblem *problem_,
                              const struct FavorInputs *inputs,
                              const struct FavorTensor *out);

// Continues some slots, each by its own chunk, in one call: the tensors hold the chunks back to
// back (`problem.batch` = 1, `problem.len` = their total tokens, any strides). Prefill for some
// slots and one-token decoding for others mix freely.
//
// # Safety
// As `favor_forward`; `chunks` null or readable with its (host) arrays valid.
enum FavorStatus favor_decode_slots(const struct FavorState *state,
                                    const struct FavorMap *map,
                                    const struct FavorProblem *problem_,
                                    const struct FavorSlotChunks *chunks,
                                    const struct FavorInputs *inputs,
                                    const struct FavorTensor *out);

// Writes the state's number of slots.
//
// # Safety
// `state` null or live; `slots` null or writable.
enum FavorStatus favor_state_slots(const struct FavorState *state, size_t *slots);

// Writes how many tokens slot `slot` has consumed.
//
// # Safety
// `state` null or live; `tokens` null or writable.
enum FavorStatus favor_state_tokens(const struct FavorState *state, size_t slot, uint64_t *tokens);

// Empties slot `slot`, as if it had consumed nothing.
//
// # Safety
// `state` null or live.
enum FavorStatus favor_state_reset_slot(const struct FavorState *state, size_t slot);

// Copies slot `from` over slot `to` (beam search, a shared prompt prefix).
//
// # Safety
// `state` null or live.
enum FavorStatus favor_state_copy_slot(const struct FavorState *state, size_t from, size_t to);

// Exports slot `slot` as bytes (versioned, with a fingerprint of the map and sizes, and a
// checksum) into `buf` (`cap` bytes); `*len` gets their number. `BUFFER_TOO_SMALL` when they do
// not fit (call with a null `buf` to ask for the size).
//
// # Safety
// `state` null or live; `buf` null or valid for `cap` bytes; `len` null or writable.
enum FavorStatus favor_state_export_slot(const struct FavorState *state,
                                         size_t slot,
                                         uint8_t *buf,
                                         size_t cap,
                                         size_t *len);

// Imports bytes from `favor_state_export_slot` into slot `slot`; `STATE_MISMATCH` when they
// were made for another problem or map, `INVALID_PARAMETER` when they are not a slot (wrong
// version, truncated, checksum mismatch).
//
// # Safety
// `state` null or live; `bytes` null or valid for `len` bytes.
enum FavorStatus favor_state_import_slot(const struct FavorState *state,
                                         size_t slot,
                                         const uint8_t *bytes,
                                         size_t len);

// Frees a state (null is a no-op).
//
// # Safety
// `state` null or live, and not used again (by any thread).
enum FavorStatus favor_state_free(struct FavorState *state);

// The message of the last failed favor call on this thread ("" after a successful one).
// The pointer stays valid until the next favor call on this thread.
const char *favor_last_error(void);

// The name of a status code ("FAVOR_STATUS_SHAPE", ...); "FAVOR_STATUS_UNKNOWN" for a value
// that is none. The string is static.
const char *favor_status_name(int32_t status);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* FAVOR_H */
