#include <stdio.h>

#include "favor.h"

enum { B = 1, H = 8, L = 1024, D = 64, N = B * H * L * D };
static float q[N], k[N], v[N], out[N];

int main(void) {
    for (size_t i = 0; i < N; i++) q[i] = k[i] = v[i] = (float)(i % 17) / 17.0f - 0.5f;

    FavorBackend *backend = NULL;
    FavorMap *map = NULL;
    FavorMapConfig features = {.kind = FAVOR_MAP_KIND_POSITIVE, .m = 256, .d = D, .seed = 0, .epsilon = -1};
    /* Zeros mean defaults: d_v = d, kv_len = len, kv_heads = heads, contiguous strides. */
    FavorProblem problem = {.batch = B, .heads = H, .len = L, .d = D, .causal = 1, .denominator_guard = -1};
    FavorInputs in = {.q = {.data = q, .len = N, .dtype = FAVOR_D_TYPE_F32},
                      .k = {.data = k, .len = N, .dtype = FAVOR_D_TYPE_F32},
                      .v = {.data = v, .len = N, .dtype = FAVOR_D_TYPE_F32}};
    FavorTensor o = {.data = out, .len = N, .dtype = FAVOR_D_TYPE_F32};

    FavorStatus s = favor_backend_open("best", &backend);
    if (s == FAVOR_STATUS_OK) s = favor_map_draw(&features, &map);
    if (s == FAVOR_STATUS_OK) s = favor_forward(backend, map, &problem, &in, &o);
    if (s != FAVOR_STATUS_OK) fprintf(stderr, "%s: %s\n", favor_status_name(s), favor_last_error());
    else printf("out[0] = %f\n", out[0]);
    favor_map_free(map);
    favor_backend_free(backend);
    return s != FAVOR_STATUS_OK;
}
