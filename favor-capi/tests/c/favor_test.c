/* Exercises every function of favor.h, its error paths included, from C.
 *
 * Usage: favor_test OUT.bin — writes the bidirectional and causal forwards and the causal
 * backward (dq, dk, dv) of one fixed problem as raw f32, which favor-capi's c_program test
 * compares with the same calls made from Rust. Exits non-zero on the first failed check. */
#include "favor.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0;

#define CHECK(call)                                                                            \
    do {                                                                                       \
        FavorStatus s_ = (call);                                                               \
        if (s_ != FAVOR_STATUS_OK) {                                                           \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,                \
                    favor_status_name(s_), favor_last_error());                                \
            exit(1);                                                                           \
        }                                                                                      \
        checks++;                                                                              \
    } while (0)

/* The call fails with `status` and a last-error message containing `needle`. */
#define EXPECT_ERR(call, status, needle)                                                       \
    do {                                                                                       \
        FavorStatus s_ = (call);                                                               \
        if (s_ != (status) || strstr(favor_last_error(), (needle)) == NULL) {                  \
            fprintf(stderr, "%s:%d: %s -> %s (\"%s\"), expected %s with \"%s\"\n", __FILE__,   \
                    __LINE__, #call, favor_status_name(s_), favor_last_error(),               \
                    favor_status_name(status), (needle));                                      \
            exit(1);                                                                           \
        }                                                                                      \
        checks++;                                                                              \
    } while (0)

#define EXPECT(cond)                                                                           \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);                \
            exit(1);                                                                           \
        }                                                                                      \
        checks++;                                                                              \
    } while (0)

/* Deterministic inputs in [-0.5, 0.5), computed exactly alike here and in the Rust test. */
static void fill(float *x, size_t n, uint32_t salt) {
    for (size_t i = 0; i < n; i++) {
        uint32_t k = ((uint32_t)i * 7919u + salt * 104729u) % 1000u;
        x[i] = (float)k / 1000.0f - 0.5f;
    }
}

static float *alloc_f32(size_t n) {
    float *p = calloc(n, sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static FavorTensor f32_tensor(float *p, size_t n) {
    FavorTensor t = {p, n, FAVOR_D_TYPE_F32, 0, 0, 0};
    return t;
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates */
    }
    return m;
}

static int all_finite(const float *a, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

/* bf16 by truncation (exact for the comparison: both sides get the same bits). */
static uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)(u >> 16);
}

/* The problem the Rust side recomputes: B = 2, H = 4 query heads over 2 key/value heads,
 * L = 37, d = 16, d_v = 12, positive features m = 32 (seed 7). */
enum { B = 2, H = 4, KVH = 2, L = 37, D = 16, DV = 12, M = 32 };
#define NQ ((size_t)B * H * L * D)
#define NK ((size_t)B * KVH * L * D)
#define NV ((size_t)B * KVH * L * DV)
#define NO ((size_t)B * H * L * DV)

static FavorProblem base_problem(int causal) {
    FavorProblem p = {B, H, L, D, DV, 0, KVH, causal, -1.0f};
    return p;
}

struct ThreadArgs {
    const FavorBackend *backend;
    const FavorMap *map;
    const float *q, *k, *v;
    float *out;
    FavorStatus status;
};

static void *forward_thread(void *arg) {
    struct ThreadArgs *a = arg;
    FavorProblem p = base_problem(0);
    FavorInputs in = {f32_tensor((float *)a->q, NQ), f32_tensor((float *)a->k, NK),
                      f32_tensor((float *)a->v, NV), NULL, 0};
    FavorTensor out = f32_tensor(a->out, NO);
    a->status = favor_forward(a->backend, a->map, &p, &in, &out);
    return NULL;
}

static void test_status_and_backends(FavorBackend **simd) {
    EXPECT(favor_abi_version() == FAVOR_ABI_VERSION);
    EXPECT(strcmp(favor_status_name(FAVOR_STATUS_OK), "FAVOR_STATUS_OK") == 0);
    EXPECT(strcmp(favor_status_name(FAVOR_STATUS_WRONG_HANDLE), "FAVOR_STATUS_WRONG_HANDLE") == 0);
    EXPECT(strcmp(favor_status_name(12345), "FAVOR_STATUS_UNKNOWN") == 0);

    size_t needed = 0;
    EXPECT_ERR(favor_backends_available(NULL, 0, &needed), FAVOR_STATUS_BUFFER_TOO_SMALL, "needs");
    EXPECT(needed > 1);
    char *ids = malloc(needed);
    CHECK(favor_backends_available(ids, needed, &needed));
    EXPECT(strstr(ids, "reference") != NULL && strstr(ids, "simd:") != NULL);
    free(ids);

    EXPECT_ERR(favor_backend_open("no-such-backend", simd), FAVOR_STATUS_INVALID_PARAMETER,
               "unknown backend");
    EXPECT_ERR(favor_backend_open(NULL, simd), FAVOR_STATUS_NULL_POINTER, "`id`");
    EXPECT_ERR(favor_backend_open("simd", NULL), FAVOR_STATUS_NULL_POINTER, "`out`");
    EXPECT_ERR(favor_backend_open("cuda:99", simd), FAVOR_STATUS_NOT_AVAILABLE, "cuda");
    CHECK(favor_backend_open("simd", simd));
    FavorBackend *dev = NULL;
    EXPECT_ERR(favor_backend_open_device("simd", NULL, &dev), FAVOR_STATUS_INVALID_PARAMETER, "not a CUDA backend");
    FavorStatus s = favor_backend_open_device("cuda", NULL, &dev);
    EXPECT(s == FAVOR_STATUS_OK || s == FAVOR_STATUS_NOT_AVAILABLE);
    if (s == FAVOR_STATUS_OK) CHECK(favor_backend_free(dev));
    bool device = true;
    CHECK(favor_backend_takes_device_pointers(*simd, &device));
    EXPECT(!device);

    char id[64], name[64];
    CHECK(favor_backend_id(*simd, id, sizeof id, NULL));
    EXPECT(strncmp(id, "simd:", 5) == 0);
    EXPECT_ERR(favor_backend_id(*simd, id, 3, &needed), FAVOR_STATUS_BUFFER_TOO_SMALL, "needs");
    EXPECT(needed == strlen(id) + 1);
    CHECK(favor_backend_name(*simd, name, sizeof name, NULL));
    EXPECT(strncmp(name, "cpu-", 4) == 0);
    bool gpu = true;
    CHECK(favor_backend_is_gpu(*simd, &gpu));
    EXPECT(!gpu);
    EXPECT_ERR(favor_backend_is_gpu(*simd, NULL), FAVOR_STATUS_NULL_POINTER, "is_gpu");
    CHECK(favor_backend_synchronize(*simd));
    EXPECT_ERR(favor_backend_synchronize(NULL), FAVOR_STATUS_NULL_POINTER, "backend");
    /* The last error is cleared by a successful call. */
    EXPECT(strcmp(favor_last_error(), "") != 0);
    CHECK(favor_backend_synchronize(*simd));
    EXPECT(strcmp(favor_last_error(), "") == 0);
}

static FavorMap *test_maps(void) {
    FavorMapConfig c = {FAVOR_MAP_KIND_POSITIVE, M, D, 7, 0, 0.0f, -1.0f};
    FavorMap *map = NULL;
    CHECK(favor_map_draw(&c, &map));
    size_t features = 0;
    CHECK(favor_map_features(map, D, &features));
    EXPECT(features == M);
    EXPECT(favor_map_features(map, D + 1, &features) != FAVOR_STATUS_OK);

    FavorMapConfig bad = c;
    bad.kind = 99;
    FavorMap *none = NULL;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_INVALID_PARAMETER, "kind");
    bad = c;
    bad.iid = 2;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_INVALID_PARAMETER, "iid");
    bad = c;
    bad.m = 0;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_ZERO_SIZE, "m");
    bad = c;
    bad.kind = FAVOR_MAP_KIND_TRIGONOMETRIC;
    bad.epsilon = 0.5f;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_INVALID_PARAMETER, "epsilon");
    bad = c;
    bad.softmax_scale = -1.0f;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_INVALID_PARAMETER, "softmax_scale");
    bad = c;
    bad.kind = FAVOR_MAP_KIND_ELU_PLUS_ONE;
    bad.softmax_scale = 0.5f;
    EXPECT_ERR(favor_map_draw(&bad, &none), FAVOR_STATUS_INVALID_PARAMETER, "softmax_scale");
    EXPECT_ERR(favor_map_draw(NULL, &none), FAVOR_STATUS_NULL_POINTER, "config");
    EXPECT(none == NULL);

    /* W out and back in: the same map. */
    size_t m = 0, d = 0;
    EXPECT_ERR(favor_map_matrix(map, NULL, 0, &m, &d), FAVOR_STATUS_BUFFER_TOO_SMALL, "W has");
    EXPECT(m == M && d == D);
    float *w = alloc_f32(m * d);
    CHECK(favor_map_matrix(map, w, m * d, &m, &d));
    FavorMap *again = NULL;
    EXPECT_ERR(favor_map_from_matrix(&c, w, m * d - 1, &again), FAVOR_STATUS_SHAPE, "`w`");
    CHECK(favor_map_from_matrix(&c, w, m * d, &again));
    float *w2 = alloc_f32(m * d);
    CHECK(favor_map_matrix(again, w2, m * d, &m, &d));
    EXPECT(memcmp(w, w2, m * d * sizeof(float)) == 0);
    w2[3] = NAN;
    FavorMap *nan_map = NULL;
    EXPECT_ERR(favor_map_from_matrix(&c, w2, m * d, &nan_map), FAVOR_STATUS_NON_FINITE, "w");
    bad = c;
    bad.kind = FAVOR_MAP_KIND_ELU_PLUS_ONE;
    EXPECT_ERR(favor_map_from_matrix(&bad, w, m * d, &nan_map), FAVOR_STATUS_INVALID_PARAMETER, "ELU");
    CHECK(favor_map_free(again));
    free(w2);

    /* ELU+1 has no matrix. */
    FavorMap *elu = NULL;
    bad = c;
    bad.kind = FAVOR_MAP_KIND_ELU_PLUS_ONE;
    CHECK(favor_map_draw(&bad, &elu));
    CHECK(favor_map_features(elu, D, &features));
    EXPECT(features == D);
    EXPECT_ERR(favor_map_matrix(elu, w, m * d, &m, &d), FAVOR_STATUS_UNSUPPORTED, "no matrix");
    CHECK(favor_map_free(elu));
    free(w);
    CHECK(favor_map_free(NULL));
    return map;
}

/* Forwards of the fixed problem, written to `file`, and the layout/dtype/grouping variants. */
static void test_forward(const FavorBackend *be, const FavorMap *map, FILE *file, const float *q,
                         const float *k, const float *v) {
    float *out = alloc_f32(NO), *out2 = alloc_f32(NO);
    FavorInputs in = {f32_tensor((float *)q, NQ), f32_tensor((float *)k, NK),
                      f32_tensor((float *)v, NV), NULL, 0};
    FavorTensor o = f32_tensor(out, NO);
    for (int causal = 0; causal <= 1; causal++) {
        FavorProblem p = base_problem(causal);
        CHECK(favor_forward(be, map, &p, &in, &o));
        EXPECT(all_finite(out, NO));
        EXPECT(fwrite(out, sizeof(float), NO, file) == NO);
    }

    /* The same causal call with q and out in [B, L, H, d] layout. */
    FavorProblem p = base_problem(1);
    float *qt = alloc_f32(NQ);
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < H; h++)
            for (size_t t = 0; t < L; t++)
                memcpy(&qt[((b * L + t) * H + h) * D], &q[((b * H + h) * L + t) * D], D * 4);
    FavorInputs in_t = in;
    in_t.q = (FavorTensor){qt, NQ, FAVOR_D_TYPE_F32, (size_t)L * H * D, D, (size_t)H * D};
    FavorTensor o_t = {out2, NO, FAVOR_D_TYPE_F32, (size_t)L * H * DV, DV, (size_t)H * DV};
    CHECK(favor_forward(be, map, &p, &in_t, &o_t));
    float worst = 0.0f;
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < H; h++)
            for (size_t t = 0; t < L; t++)
                for (size_t j = 0; j < DV; j++) {
                    float x = out2[((b * L + t) * H + h) * DV + j];
                    float y = out[((b * H + h) * L + t) * DV + j];
                    if (fabsf(x - y) > worst) worst = fabsf(x - y);
                }
    EXPECT(worst <= 1e-6f);
    free(qt);

    /* bf16 tensors: close to f32. */
    uint16_t *qb = malloc(NQ * 2), *kb = malloc(NK * 2), *vb = malloc(NV * 2), *ob = malloc(NO * 2);
    for (size_t i = 0; i < NQ; i++) qb[i] = to_bf16(q[i]);
    for (size_t i = 0; i < NK; i++) kb[i] = to_bf16(k[i]);
    for (size_t i = 0; i < NV; i++) vb[i] = to_bf16(v[i]);
    FavorInputs in_b = {{qb, NQ, FAVOR_D_TYPE_BF16, 0, 0, 0}, {kb, NK, FAVOR_D_TYPE_BF16, 0, 0, 0},
                        {vb, NV, FAVOR_D_TYPE_BF16, 0, 0, 0}, NULL, 0};
    FavorTensor o_b = {ob, NO, FAVOR_D_TYPE_BF16, 0, 0, 0};
    CHECK(favor_forward(be, map, &p, &in_b, &o_b));
    worst = 0.0f;
    for (size_t i = 0; i < NO; i++) {
        uint32_t u = (uint32_t)ob[i] << 16;
        float x;
        memcpy(&x, &u, 4);
        if (fabsf(x - out[i]) > worst) worst = fabsf(x - out[i]);
    }
    EXPECT(worst < 0.05f);
    /* A dtype that differs from q's, and one that does not exist. */
    FavorInputs mixed = in;
    mixed.k = in_b.k;
    EXPECT_ERR(favor_forward(be, map, &p, &mixed, &o), FAVOR_STATUS_DTYPE, "`k`");
    mixed = in;
    mixed.q.dtype = 7;
    EXPECT_ERR(favor_forward(be, map, &p, &mixed, &o), FAVOR_STATUS_DTYPE, "unknown dtype");
    free(qb), free(kb), free(vb), free(ob);

    /* A key padding mask: padding the last keys of batch 1 changes only batch 1. */
    uint8_t mask[B * L];
    memset(mask, 1, sizeof mask);
    for (size_t t = L - 5; t < L; t++) mask[L + t] = 0;
    FavorInputs in_m = in;
    in_m.key_mask = mask;
    in_m.key_mask_len = sizeof mask;
    FavorProblem pb = base_problem(0);
    CHECK(favor_forward(be, map, &pb, &in, &o));
    o_t = f32_tensor(out2, NO);
    CHECK(favor_forward(be, map, &pb, &in_m, &o_t));
    EXPECT(max_abs_diff(out, out2, NO / 2) <= 1e-6f);
    EXPECT(max_abs_diff(out + NO / 2, out2 + NO / 2, NO / 2) > 0.0f);
    in_m.key_mask_len = sizeof mask - 1;
    EXPECT_ERR(favor_forward(be, map, &pb, &in_m, &o), FAVOR_STATUS_SHAPE, "key_mask");

    /* Cross-attention: 37 queries over 20 keys, bidirectional only. */
    FavorProblem px = pb;
    px.kv_len = 20;
    FavorInputs in_x = in;
    in_x.k.len = (size_t)B * KVH * 20 * D;
    in_x.v.len = (size_t)B * KVH * 20 * DV;
    CHECK(favor_forward(be, map, &px, &in_x, &o));
    EXPECT(all_finite(out, NO));
    px.causal = 1;
    EXPECT_ERR(favor_forward(be, map, &px, &in_x, &o), FAVOR_STATUS_INVALID_PARAMETER, "kv_len");

    /* Bad calls. */
    FavorProblem bad = pb;
    bad.causal = 2;
    EXPECT_ERR(favor_forward(be, map, &bad, &in, &o), FAVOR_STATUS_INVALID_PARAMETER, "causal");
    bad = pb;
    bad.kv_heads = 3;
    EXPECT_ERR(favor_forward(be, map, &bad, &in, &o), FAVOR_STATUS_INVALID_PARAMETER, "kv_heads");
    bad = pb;
    bad.batch = 0;
    EXPECT_ERR(favor_forward(be, map, &bad, &in, &o), FAVOR_STATUS_ZERO_SIZE, "batch");
    FavorInputs short_q = in;
    short_q.q.len = NQ - 1;
    EXPECT_ERR(favor_forward(be, map, &pb, &short_q, &o), FAVOR_STATUS_SHAPE, "`q`");
    FavorInputs null_q = in;
    null_q.q.data = NULL;
    EXPECT_ERR(favor_forward(be, map, &pb, &null_q, &o), FAVOR_STATUS_NULL_POINTER, "`q`");
    FavorInputs odd = in;
    odd.q.data = (char *)q + 1;
    EXPECT_ERR(favor_forward(be, map, &pb, &odd, &o), FAVOR_STATUS_INVALID_PARAMETER, "aligned");
    FavorInputs overlapping_rows = in;
    overlapping_rows.q.batch_stride = (size_t)H * L * D;
    overlapping_rows.q.head_stride = (size_t)L * D;
    overlapping_rows.q.token_stride = D - 1;
    EXPECT_ERR(favor_forward(be, map, &pb, &overlapping_rows, &o), FAVOR_STATUS_STRIDES, "q");
    FavorTensor in_place = f32_tensor((float *)q, NO); /* q holds more than NO floats */
    EXPECT_ERR(favor_forward(be, map, &pb, &in, &in_place), FAVOR_STATUS_STRIDES, "overlaps");
    float *nan_q = alloc_f32(NQ);
    memcpy(nan_q, q, NQ * 4);
    nan_q[100] = NAN;
    FavorInputs with_nan = in;
    with_nan.q.data = nan_q;
    EXPECT_ERR(favor_forward(be, map, &pb, &with_nan, &o), FAVOR_STATUS_NON_FINITE, "`q`");
    free(nan_q);
    EXPECT_ERR(favor_forward((const FavorBackend *)map, map, &pb, &in, &o), FAVOR_STATUS_WRONG_HANDLE,
               "must be a FavorBackend, got a FavorMap");
    EXPECT_ERR(favor_forward(be, (const FavorMap *)be, &pb, &in, &o), FAVOR_STATUS_WRONG_HANDLE,
               "must be a FavorMap, got a FavorBackend");
    EXPECT_ERR(favor_forward(be, map, NULL, &in, &o), FAVOR_STATUS_NULL_POINTER, "problem");
    EXPECT_ERR(favor_forward(be, map, &pb, NULL, &o), FAVOR_STATUS_NULL_POINTER, "inputs");
    EXPECT_ERR(favor_forward(be, map, &pb, &in, NULL), FAVOR_STATUS_NULL_POINTER, "out");

    /* Two threads on one backend and map at once. */
    float *outs[2] = {alloc_f32(NO), alloc_f32(NO)};
    struct ThreadArgs args[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        args[i] = (struct ThreadArgs){be, map, q, k, v, outs[i], FAVOR_STATUS_INTERNAL};
        EXPECT(pthread_create(&th[i], NULL, forward_thread, &args[i]) == 0);
    }
    for (int i = 0; i < 2; i++) EXPECT(pthread_join(th[i], NULL) == 0 && args[i].status == FAVOR_STATUS_OK);
    CHECK(favor_forward(be, map, &pb, &in, &o));
    EXPECT(memcmp(outs[0], out, NO * 4) == 0 && memcmp(outs[1], out, NO * 4) == 0);
    free(outs[0]), free(outs[1]);
    free(out), free(out2);
}

static void test_backward(const FavorBackend *be, const FavorMap *map, FILE *file, const float *q,
                          const float *k, const float *v) {
    float *dout = alloc_f32(NO), *dq = alloc_f32(NQ), *dk = alloc_f32(NK), *dv = alloc_f32(NV);
    fill(dout, NO, 4);
    FavorInputs in = {f32_tensor((float *)q, NQ), f32_tensor((float *)k, NK),
                      f32_tensor((float *)v, NV), NULL, 0};
    FavorTensor g = f32_tensor(dout, NO);
    FavorGrads grads = {f32_tensor(dq, NQ), f32_tensor(dk, NK), f32_tensor(dv, NV)};
    FavorProblem p = base_problem(1);
    CHECK(favor_backward(be, map, &p, &in, &g, &grads, NULL));
    EXPECT(all_finite(dq, NQ) && all_finite(dk, NK) && all_finite(dv, NV));
    EXPECT(fwrite(dq, 4, NQ, file) == NQ && fwrite(dk, 4, NK, file) == NK && fwrite(dv, 4, NV, file) == NV);

    FavorGrads alias = grads;
    alias.dk = f32_tensor(dq, NK);
    EXPECT_ERR(favor_backward(be, map, &p, &in, &g, &alias, NULL), FAVOR_STATUS_STRIDES, "overlaps");
    EXPECT_ERR(favor_backward(be, map, &p, &in, NULL, &grads, NULL), FAVOR_STATUS_NULL_POINTER, "dout");
    FavorGrads short_dv = grads;
    short_dv.dv.len = NV - 1;
    EXPECT_ERR(favor_backward(be, map, &p, &in, &g, &short_dv, NULL), FAVOR_STATUS_SHAPE, "dv");

    /* A learned Softplus map returns its parameter gradients; a wrong-sized buffer is refused
     * before anything runs. */
    float *w = alloc_f32((size_t)M * D), *bias = alloc_f32(M);
    fill(w, (size_t)M * D, 5);
    fill(bias, M, 6);
    FavorMap *soft = NULL;
    EXPECT_ERR(favor_map_softplus(M, D, w, (size_t)M * D, bias, M - 1, &soft), FAVOR_STATUS_SHAPE, "bias");
    EXPECT_ERR(favor_map_softplus(M, D, NULL, 0, NULL, 0, &soft), FAVOR_STATUS_NULL_POINTER, "`w`");
    CHECK(favor_map_softplus(M, D, w, (size_t)M * D, bias, M, &soft));
    float *dw = alloc_f32((size_t)M * D), *db = alloc_f32(M);
    FavorParamGrads pg = {dw, (size_t)M * D, db, M, NULL, 0};
    CHECK(favor_backward(be, soft, &p, &in, &g, &grads, &pg));
    float norm = 0.0f;
    for (size_t i = 0; i < (size_t)M * D; i++) norm += fabsf(dw[i]);
    EXPECT(norm > 0.0f && all_finite(dw, (size_t)M * D) && all_finite(db, M));
    FavorParamGrads short_pg = pg;
    short_pg.dbias_len = M - 1;
    EXPECT_ERR(favor_backward(be, soft, &p, &in, &g, &grads, &short_pg), FAVOR_STATUS_SHAPE, "dbias");
    FavorParamGrads aliased_pg = pg;
    aliased_pg.dw = dq;
    EXPECT_ERR(favor_backward(be, soft, &p, &in, &g, &grads, &aliased_pg), FAVOR_STATUS_STRIDES, "overlaps");
    CHECK(favor_map_free(soft));

    /* The gated map's three gradients. */
    FavorMap *gated = NULL;
    float *wg = alloc_f32((size_t)M * D), *dwg = alloc_f32((size_t)M * D);
    fill(wg, (size_t)M * D, 8);
    EXPECT_ERR(favor_map_gated_softplus(M, D, w, wg, (size_t)M * D - 1, &gated), FAVOR_STATUS_SHAPE, "w_filter");
    CHECK(favor_map_gated_softplus(M, D, w, wg, (size_t)M * D, &gated));
    FavorParamGrads gpg = {dw, (size_t)M * D, NULL, 0, dwg, (size_t)M * D};
    CHECK(favor_backward(be, gated, &p, &in, &g, &grads, &gpg));
    EXPECT(all_finite(dwg, (size_t)M * D));
    gpg.dw_gate = NULL;
    EXPECT_ERR(favor_backward(be, gated, &p, &in, &g, &grads, &gpg), FAVOR_STATUS_NULL_POINTER, "dw_gate");
    CHECK(favor_map_free(gated));
    free(w), free(bias), free(dw), free(db), free(wg), free(dwg);
    free(dout), free(dq), free(dk), free(dv);
}

/* Two sequences of 3 and 5 tokens packed back to back equal two separate calls. */
static void test_ragged(const FavorBackend *be, const FavorMap *map) {
    enum { T = 8, RH = 2 };
    size_t nq = (size_t)T * RH * D, nv = (size_t)T * RH * DV;
    float *q = alloc_f32(nq), *k = alloc_f32(nq), *v = alloc_f32(nv), *out = alloc_f32(nv);
    float *one = alloc_f32(nv), *dout = alloc_f32(nv), *dq = alloc_f32(nq), *dk = alloc_f32(nq), *dv = alloc_f32(nv);
    fill(q, nq, 11), fill(k, nq, 12), fill(v, nv, 13), fill(dout, nv, 14);
    /* [1, L, H, d] layout: the packed sequences' natural layout. */
    FavorTensor tq = {q, nq, FAVOR_D_TYPE_F32, nq, D, (size_t)RH * D};
    FavorTensor tk = {k, nq, FAVOR_D_TYPE_F32, nq, D, (size_t)RH * D};
    FavorTensor tv = {v, nv, FAVOR_D_TYPE_F32, nv, DV, (size_t)RH * DV};
    FavorTensor to = {out, nv, FAVOR_D_TYPE_F32, nv, DV, (size_t)RH * DV};
    FavorInputs in = {tq, tk, tv, NULL, 0};
    size_t offsets[3] = {0, 3, 8};
    FavorRagged r = {offsets, 3, NULL, 0};
    for (int causal = 0; causal <= 1; causal++) {
        FavorProblem p = {1, RH, T, D, DV, 0, 0, causal, -1.0f};
        CHECK(favor_forward_ragged(be, map, &p, &r, &in, &to));
        for (int s = 0; s < 2; s++) {
            size_t t0 = offsets[s], n = offsets[s + 1] - offsets[s];
            FavorProblem ps = {1, RH, n, D, DV, 0, 0, causal, -1.0f};
            FavorInputs ins = {{q + t0 * RH * D, n * RH * D, FAVOR_D_TYPE_F32, n * RH * D, D, (size_t)RH * D},
                               {k + t0 * RH * D, n * RH * D, FAVOR_D_TYPE_F32, n * RH * D, D, (size_t)RH * D},
                               {v + t0 * RH * DV, n * RH * DV, FAVOR_D_TYPE_F32, n * RH * DV, DV, (size_t)RH * DV},
                               NULL, 0};
            FavorTensor os = {one, n * RH * DV, FAVOR_D_TYPE_F32, n * RH * DV, DV, (size_t)RH * DV};
            CHECK(favor_forward(be, map, &ps, &ins, &os));
            EXPECT(max_abs_diff(one, out + t0 * RH * DV, n * RH * DV) <= 1e-6f);
        }
        FavorTensor g = {dout, nv, FAVOR_D_TYPE_F32, nv, DV, (size_t)RH * DV};
        FavorGrads grads = {{dq, nq, FAVOR_D_TYPE_F32, nq, D, (size_t)RH * D},
                            {dk, nq, FAVOR_D_TYPE_F32, nq, D, (size_t)RH * D},
                            {dv, nv, FAVOR_D_TYPE_F32, nv, DV, (size_t)RH * DV}};
        CHECK(favor_backward_ragged(be, map, &p, &r, &in, &g, &grads, NULL));
        EXPECT(all_finite(dq, nq) && all_finite(dk, nq) && all_finite(dv, nv));
    }
    FavorProblem p = {1, RH, T, D, DV, 0, 0, 0, -1.0f};
    size_t decreasing[3] = {0, 5, 3};
    FavorRagged bad = {decreasing, 3, NULL, 0};
    EXPECT_ERR(favor_forward_ragged(be, map, &p, &bad, &in, &to), FAVOR_STATUS_INVALID_PARAMETER, "offsets");
    FavorRagged null_offsets = {NULL, 3, NULL, 0};
    EXPECT_ERR(favor_forward_ragged(be, map, &p, &null_offsets, &in, &to), FAVOR_STATUS_NULL_POINTER, "offsets");
    /* Cross-attention per sequence: 3 + 5 queries over 4 + 4 keys. */
    size_t kv_offsets[3] = {0, 4, 8};
    FavorRagged cross = {offsets, 3, kv_offsets, 3};
    CHECK(favor_forward_ragged(be, map, &p, &cross, &in, &to));
    free(q), free(k), free(v), free(out), free(one), free(dout), free(dq), free(dk), free(dv);
}

static void test_feature_map(const FavorBackend *be, const FavorMap *map) {
    enum { FL = 9 };
    size_t nx = (size_t)B * H * FL * D, nphi = (size_t)B * H * FL * M;
    float *x = alloc_f32(nx), *phi = alloc_f32(nphi), *dx = alloc_f32(nx);
    fill(x, nx, 21);
    FavorProblem p = {B, H, FL, D, 0, 0, 0, 0, -1.0f};
    FavorTensor tx = f32_tensor(x, nx), tphi = f32_tensor(phi, nphi), tdx = f32_tensor(dx, nx);
    CHECK(favor_feature_map(be, map, FAVOR_ROLE_QUERY, &p, &tx, &tphi));
    for (size_t i = 0; i < nphi; i++) EXPECT(phi[i] > 0.0f);
    CHECK(favor_feature_map_backward(be, map, FAVOR_ROLE_KEY, &p, &tx, &tphi, &tdx, NULL));
    EXPECT(all_finite(dx, nx));
    EXPECT_ERR(favor_feature_map(be, map, 9, &p, &tx, &tphi), FAVOR_STATUS_INVALID_PARAMETER, "role");
    FavorTensor strided = tx;
    strided.token_stride = D;
    strided.head_stride = (size_t)FL * D;
    strided.batch_stride = (size_t)H * FL * D;
    EXPECT_ERR(favor_feature_map(be, map, FAVOR_ROLE_QUERY, &p, &strided, &tphi), FAVOR_STATUS_UNSUPPORTED, "contiguous");
    tphi.len = nphi - 1;
    EXPECT_ERR(favor_feature_map(be, map, FAVOR_ROLE_QUERY, &p, &tx, &tphi), FAVOR_STATUS_SHAPE, "phi");
    free(x), free(phi), free(dx);
}

/* Slots: prefill + one-token decoding equal full causal attention; export, import, reset and
 * copy of slots; mismatched state bytes are typed errors. */
static void test_state(const FavorBackend *be, const FavorMap *map, const float *q, const float *k,
                       const float *v) {
    FavorProblem full = base_problem(1);
    float *want = alloc_f32(NO);
    FavorInputs in = {f32_tensor((float *)q, NQ), f32_tensor((float *)k, NK),
                      f32_tensor((float *)v, NV), NULL, 0};
    FavorTensor o = f32_tensor(want, NO);
    CHECK(favor_forward(be, map, &full, &in, &o));

    FavorState *st = NULL;
    FavorProblem sp = base_problem(1);
    CHECK(favor_state_new(be, map, &sp, &st));
    size_t slots = 0;
    CHECK(favor_state_slots(st, &slots));
    EXPECT(slots == B);
    /* Prefill L − 1 tokens of both slots with strided views of the full tensors, then decode
     * the last token. */
    float *got = alloc_f32(NO);
    for (int part = 0; part < 2; part++) {
        size_t t0 = part == 0 ? 0 : L - 1, n = part == 0 ? L - 1 : 1;
        FavorProblem pp = sp;
        pp.len = n;
        FavorInputs ins = {{(float *)q + t0 * D, NQ - t0 * D, FAVOR_D_TYPE_F32, (size_t)H * L * D, (size_t)L * D, D},
                           {(float *)k + t0 * D, NK - t0 * D, FAVOR_D_TYPE_F32, (size_t)KVH * L * D, (size_t)L * D, D},
                           {(float *)v + t0 * DV, NV - t0 * DV, FAVOR_D_TYPE_F32, (size_t)KVH * L * DV, (size_t)L * DV, DV},
                           NULL, 0};
        FavorTensor os = {got + t0 * DV, NO - t0 * DV, FAVOR_D_TYPE_F32, (size_t)H * L * DV, (size_t)L * DV, DV};
        CHECK(favor_decode(st, map, &pp, &ins, &os));
    }
    EXPECT(max_abs_diff(got, want, NO) <= 1e-5f);
    uint64_t tokens = 0;
    CHECK(favor_state_tokens(st, 1, &tokens));
    EXPECT(tokens == L);

    /* Export slot 0, reset it, import it back. */
    size_t len = 0;
    EXPECT_ERR(favor_state_export_slot(st, 0, NULL, 0, &len), FAVOR_STATUS_BUFFER_TOO_SMALL, "needs");
    uint8_t *bytes = malloc(len);
    CHECK(favor_state_export_slot(st, 0, bytes, len, &len));
    CHECK(favor_state_reset_slot(st, 0));
    CHECK(favor_state_tokens(st, 0, &tokens));
    EXPECT(tokens == 0);
    CHECK(favor_state_import_slot(st, 0, bytes, len));
    CHECK(favor_state_tokens(st, 0, &tokens));
    EXPECT(tokens == L);
    bytes[len / 2] ^= 1;
    EXPECT_ERR(favor_state_import_slot(st, 0, bytes, len), FAVOR_STATUS_INVALID_PARAMETER, "slot bytes");
    EXPECT_ERR(favor_state_import_slot(st, 0, bytes, 3), FAVOR_STATUS_INVALID_PARAMETER, "slot bytes");
    bytes[len / 2] ^= 1;
    EXPECT_ERR(favor_state_import_slot(st, 7, bytes, len), FAVOR_STATUS_INVALID_PARAMETER, "slot");

    /* One more token for slot 1 only, through decode_slots, after copying slot 1 over 0: both
     * slots then agree with each other on that token. */
    CHECK(favor_state_copy_slot(st, 1, 0));
    EXPECT_ERR(favor_state_copy_slot(st, 1, 9), FAVOR_STATUS_INVALID_PARAMETER, "to");
    float qn[2 * H * D], kn[2 * KVH * D], vn[2 * KVH * DV], on[2][2 * H * DV];
    fill(qn, 2 * H * D, 31), fill(kn, 2 * KVH * D, 32), fill(vn, 2 * KVH * DV, 33);
    FavorProblem one = {1, H, 1, D, DV, 0, KVH, 1, -1.0f};
    FavorInputs ins = {f32_tensor(qn, H * D), f32_tensor(kn, KVH * D), f32_tensor(vn, KVH * DV), NULL, 0};
    for (size_t s = 0; s < 2; s++) {
        size_t slot_ids[1] = {s}, offsets[2] = {0, 1};
        FavorSlotChunks chunks = {slot_ids, 1, offsets, 2};
        FavorTensor os = f32_tensor(on[s], H * DV);
        CHECK(favor_decode_slots(st, map, &one, &chunks, &ins, &os));
    }
    EXPECT(memcmp(on[0], on[1], (size_t)H * DV * 4) == 0);
    size_t twice[2] = {1, 1}, offsets2[3] = {0, 1, 2};
    FavorSlotChunks dup = {twice, 2, offsets2, 3};
    FavorProblem two = one;
    two.len = 2;
    FavorInputs ins2 = {f32_tensor(qn, 2 * H * D), f32_tensor(kn, 2 * KVH * D), f32_tensor(vn, 2 * KVH * DV), NULL, 0};
    FavorTensor os2 = f32_tensor(on[0], 2 * H * DV);
    EXPECT_ERR(favor_decode_slots(st, map, &two, &dup, &ins2, &os2), FAVOR_STATUS_INVALID_PARAMETER, "slot");
    EXPECT_ERR(favor_decode_slots(st, map, &two, &dup, &ins2, NULL), FAVOR_STATUS_NULL_POINTER, "out");

    /* A state for another map refuses this one, and its slots refuse these bytes. */
    FavorMapConfig c = {FAVOR_MAP_KIND_POSITIVE, M, D, 8, 0, 0.0f, -1.0f};
    FavorMap *other = NULL;
    CHECK(favor_map_draw(&c, &other));
    FavorState *st2 = NULL;
    CHECK(favor_state_new(be, other, &sp, &st2));
    EXPECT_ERR(favor_state_import_slot(st2, 0, bytes, len), FAVOR_STATUS_STATE_MISMATCH, "");
    FavorProblem pp = sp;
    pp.len = L;
    FavorTensor os = f32_tensor(got, NO);
    EXPECT_ERR(favor_decode(st2, map, &pp, &in, &os), FAVOR_STATUS_STATE_MISMATCH, "");
    EXPECT_ERR(favor_state_slots((const FavorState *)map, &slots), FAVOR_STATUS_WRONG_HANDLE, "FavorState");
    EXPECT_ERR(favor_state_free((FavorState *)be), FAVOR_STATUS_WRONG_HANDLE, "FavorState");
    CHECK(favor_state_free(st2));
    CHECK(favor_map_free(other));
    CHECK(favor_state_free(st));
    CHECK(favor_state_free(NULL));
    free(bytes), free(got), free(want);
}

/* The device path on the CUDA emulator, whose "device" memory is host memory: forward,
 * backward and decoding through device pointers agree with the CPU backend. */
static void test_device(const FavorBackend *host, const FavorMap *map, const float *q, const float *k,
                        const float *v) {
    FavorBackend *dev = NULL;
    CHECK(favor_backend_open_device("cuda-emulated", NULL, &dev));
    EXPECT_ERR(favor_backend_open_device("cuda-emulated", (void *)host, &dev), FAVOR_STATUS_INVALID_PARAMETER, "stream");
    bool on_device = false;
    CHECK(favor_backend_takes_device_pointers(dev, &on_device));
    EXPECT(on_device);
    char id[32];
    CHECK(favor_backend_id(dev, id, sizeof id, NULL));
    EXPECT(strcmp(id, "cuda-emulated") == 0);
    float *want = alloc_f32(NO), *got = alloc_f32(NO);
    FavorInputs in = {f32_tensor((float *)q, NQ), f32_tensor((float *)k, NK), f32_tensor((float *)v, NV), NULL, 0};
    FavorTensor ow = f32_tensor(want, NO), og = f32_tensor(got, NO);
    for (int causal = 0; causal <= 1; causal++) {
        FavorProblem p = base_problem(causal);
        CHECK(favor_forward(host, map, &p, &in, &ow));
        CHECK(favor_forward(dev, map, &p, &in, &og));
        CHECK(favor_backend_synchronize(dev));
        EXPECT(max_abs_diff(got, want, NO) <= 1e-4f);
    }
    float *dout = alloc_f32(NO), *dq = alloc_f32(NQ), *dk = alloc_f32(NK), *dv = alloc_f32(NV);
    float *dq2 = alloc_f32(NQ), *dk2 = alloc_f32(NK), *dv2 = alloc_f32(NV);
    fill(dout, NO, 4);
    FavorTensor g = f32_tensor(dout, NO);
    FavorGrads gh = {f32_tensor(dq, NQ), f32_tensor(dk, NK), f32_tensor(dv, NV)};
    FavorGrads gd = {f32_tensor(dq2, NQ), f32_tensor(dk2, NK), f32_tensor(dv2, NV)};
    FavorProblem pc = base_problem(1);
    CHECK(favor_backward(host, map, &pc, &in, &g, &gh, NULL));
    CHECK(favor_backward(dev, map, &pc, &in, &g, &gd, NULL));
    CHECK(favor_backend_synchronize(dev));
    EXPECT(max_abs_diff(dq, dq2, NQ) <= 1e-3f && max_abs_diff(dk, dk2, NK) <= 1e-3f && max_abs_diff(dv, dv2, NV) <= 1e-3f);
    /* A device state: prefill all but the last token, then decode it; export a slot. */
    FavorState *st = NULL;
    CHECK(favor_state_new(dev, map, &pc, &st));
    CHECK(favor_forward(host, map, &pc, &in, &ow));
    for (int part = 0; part < 2; part++) {
        size_t t0 = part == 0 ? 0 : L - 1, n = part == 0 ? L - 1 : 1;
        FavorProblem pp = pc;
        pp.len = n;
        FavorInputs ins = {{(float *)q + t0 * D, NQ - t0 * D, FAVOR_D_TYPE_F32, (size_t)H * L * D, (size_t)L * D, D},
                           {(float *)k + t0 * D, NK - t0 * D, FAVOR_D_TYPE_F32, (size_t)KVH * L * D, (size_t)L * D, D},
                           {(float *)v + t0 * DV, NV - t0 * DV, FAVOR_D_TYPE_F32, (size_t)KVH * L * DV, (size_t)L * DV, DV},
                           NULL, 0};
        FavorTensor os = {got + t0 * DV, NO - t0 * DV, FAVOR_D_TYPE_F32, (size_t)H * L * DV, (size_t)L * DV, DV};
        CHECK(favor_decode(st, map, &pp, &ins, &os));
    }
    CHECK(favor_backend_synchronize(dev));
    EXPECT(max_abs_diff(got, want, NO) <= 1e-4f);
    uint64_t tokens = 0;
    CHECK(favor_state_tokens(st, 1, &tokens));
    EXPECT(tokens == L);
    size_t len = 0;
    EXPECT_ERR(favor_state_export_slot(st, 0, NULL, 0, &len), FAVOR_STATUS_BUFFER_TOO_SMALL, "needs");
    CHECK(favor_state_reset_slot(st, 0));
    CHECK(favor_state_free(st));
    CHECK(favor_backend_free(dev));
    free(want), free(got), free(dout), free(dq), free(dk), free(dv), free(dq2), free(dk2), free(dv2);
    printf("device path (CUDA emulator): checked\n");
}

int main(int argc, char **argv) {
    if (argc != 2 && !(argc == 3 && strcmp(argv[2], "device") == 0)) {
        fprintf(stderr, "usage: %s OUT.bin [device]\n", argv[0]);
        return 2;
    }
    FILE *file = fopen(argv[1], "wb");
    if (!file) {
        perror(argv[1]);
        return 2;
    }
    FavorBackend *be = NULL;
    test_status_and_backends(&be);
    FavorMap *map = test_maps();
    float *q = alloc_f32(NQ), *k = alloc_f32(NK), *v = alloc_f32(NV);
    fill(q, NQ, 1), fill(k, NK, 2), fill(v, NV, 3);
    test_forward(be, map, file, q, k, v);
    test_backward(be, map, file, q, k, v);
    test_ragged(be, map);
    test_feature_map(be, map);
    test_state(be, map, q, k, v);
    if (argc == 3) test_device(be, map, q, k, v);
    EXPECT_ERR(favor_backend_free((FavorBackend *)map), FAVOR_STATUS_WRONG_HANDLE, "FavorBackend");
    CHECK(favor_map_free(map));
    CHECK(favor_backend_free(be));
    free(q), free(k), free(v);
    if (fclose(file) != 0) return 2;
    printf("favor C API: %d checks passed\n", checks);
    return 0;
}
