/* Philox4x32-10 (Salmon et al., SC'11 "Parallel random numbers: as easy as 1, 2, 3") with the
 * Box–Muller transform: float32 N(0, 1) fills for CPU noise (see mechanisms/philox_normals.py).
 *
 * Block b of a stream (key k, stream words s) is Philox4x32-10 of the counter (b mod 2^32,
 * b >> 32, s0, s1) under key k: four uniform 32-bit words w0..w3, turned into four normals by
 * Box–Muller on the pairs (w0, w1) and (w2, w3):
 *     r = sqrt(-2 ln u),  u = (w_even >> 1 + 1/2) · 2^-31 ∈ (0, 1]   (tails to 6.66σ)
 *     a = 2π v,           v = (w_odd >> 8) · 2^-24 ∈ [0, 1)
 *     z = (r cos a, r sin a)
 * LANES consecutive blocks form a group of 4·LANES outputs, stored as out[k·LANES + l] = normal k
 * of block l. The kernel also scales the normals and adds them to a tensor in the same pass
 * (out = α·src + s·z, with one s per row if asked), so noise never needs a buffer of its own. The rounds and the transform are written lane-wise so that the compiler vectorises
 * them (glibc's libmvec supplies vector logf / sinf / cosf); target_clones builds an AVX-512, an
 * AVX2 and a baseline version, chosen at load time for the CPU it runs on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 32
#define ROUNDS 10
#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define MASK32 0xffffffffu

/* Ten rounds on LANES counters at once; words are kept in 64-bit lanes so that each 32×32→64
 * product is one vector multiply with no widening shuffles. */
static inline void philox_lanes(uint64_t c0[LANES], uint64_t c1[LANES], uint64_t c2[LANES],
                                uint64_t c3[LANES], uint64_t k0, uint64_t k1) {
    for (int r = 0; r < ROUNDS; r++) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            uint64_t p0 = (uint64_t)M0 * c0[l], p1 = (uint64_t)M1 * c2[l];
            uint64_t n0 = (p1 >> 32) ^ c1[l] ^ k0, n2 = (p0 >> 32) ^ c3[l] ^ k1;
            c1[l] = p1 & MASK32;
            c3[l] = p0 & MASK32;
            c0[l] = n0;
            c2[l] = n2;
        }
        k0 = (k0 + W0) & MASK32;
        k1 = (k1 + W1) & MASK32;
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* out[i] = alpha·src[i] + scale_i·z_i for i < n, z_i the i-th normal from first_block on (src NULL:
 * 0; scales NULL: scale_i = scale, else scale_i = scales[(col0 + i) / row_len], one scale a row) */
CLONES static void normal_axpy(float *out, const float *src, float alpha, const float *scales, float scale,
                               int64_t col0, int64_t row_len, int64_t n, uint64_t first_block,
                               uint64_t stream, uint64_t key) {
    const float two_pi = 6.283185307179586f;
    const uint64_t k0 = key & MASK32, k1 = key >> 32, s0 = stream & MASK32, s1 = stream >> 32;
    for (int64_t done = 0; done < n; done += 4 * LANES) {
        uint64_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
        const uint64_t b0 = first_block + (uint64_t)(done / 4);
        for (int l = 0; l < LANES; l++) {
            const uint64_t b = b0 + (uint64_t)l;
            c0[l] = b & MASK32;
            c1[l] = b >> 32;
            c2[l] = s0;
            c3[l] = s1;
        }
        philox_lanes(c0, c1, c2, c3, k0, k1);
        float z[4 * LANES];
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const float u1 = (float)(int32_t)(c0[l] >> 1) * 0x1p-31f + 0x1p-32f;
            const float v1 = (float)(int32_t)(c1[l] >> 8) * 0x1p-24f;
            const float u2 = (float)(int32_t)(c2[l] >> 1) * 0x1p-31f + 0x1p-32f;
            const float v2 = (float)(int32_t)(c3[l] >> 8) * 0x1p-24f;
            const float r1 = sqrtf(-2.0f * logf(u1)), r2 = sqrtf(-2.0f * logf(u2));
            z[l] = r1 * cosf(two_pi * v1);
            z[LANES + l] = r1 * sinf(two_pi * v1);
            z[2 * LANES + l] = r2 * cosf(two_pi * v2);
            z[3 * LANES + l] = r2 * sinf(two_pi * v2);
        }
        const int64_t count = n - done < 4 * LANES ? n - done : 4 * LANES;
        float *o = out + done;
        const float *in = src ? src + done : NULL;
        for (int64_t j = 0; j < count;) {  /* segments of one scale: one row of `scales`, or all */
            int64_t end = count;
            float sc = scale;
            if (scales) {
                const int64_t row = (col0 + done + j) / row_len;
                const int64_t row_end = (row + 1) * row_len - col0 - done;
                end = row_end < count ? row_end : count;
                sc = scales[row];
            }
            if (in) {
#pragma omp simd
                for (int64_t i = j; i < end; i++) o[i] = alpha * in[i] + sc * z[i];
            } else {
#pragma omp simd
                for (int64_t i = j; i < end; i++) o[i] = sc * z[i];
            }
            j = end;
        }
    }
}

/* philox4x32_10(c0, c1, c2, c3, k0, k1) -> (w0, w1, w2, w3): one block, for known-answer tests */
static PyObject *py_philox4x32_10(PyObject *self, PyObject *args) {
    unsigned int c[4], k[2];
    if (!PyArg_ParseTuple(args, "IIIIII", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]))
        return NULL;
    uint64_t c0[LANES] = {0}, c1[LANES] = {0}, c2[LANES] = {0}, c3[LANES] = {0};
    c0[0] = c[0]; c1[0] = c[1]; c2[0] = c[2]; c3[0] = c[3];
    philox_lanes(c0, c1, c2, c3, k[0], k[1]);
    return Py_BuildValue("(kkkk)", (unsigned long)c0[0], (unsigned long)c1[0], (unsigned long)c2[0],
                         (unsigned long)c3[0]);
}

/* normal_axpy_jobs(ints, floats, njobs, threads[, piece]): job j is normal_axpy with
 * ints[9j..9j+9) = (out, src, scales, col0, row_len, n, first_block, stream, key) and
 * floats[2j..2j+2) = (alpha, scale); the jobs are independent, and run on `threads` OpenMP
 * threads (the pool torch's own operators use, so its waiting workers take them at once).
 * With `piece` (a positive multiple of 4·LANES), each job is cut into pieces of `piece` outputs, run
 * as jobs of their own: the piece at offset s writes out[s..], reads src[s..], takes its scales from
 * row (col0 + s + i) / row_len and starts at block first_block + s/4 — the numbers the whole job gives
 * (a group of 4·LANES outputs is LANES consecutive blocks), on any number of threads. */
static PyObject *py_normal_axpy_jobs(PyObject *self, PyObject *args) {
    unsigned long long ints_addr, floats_addr;
    long long njobs, piece = 0;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLi|L", &ints_addr, &floats_addr, &njobs, &threads, &piece))
        return NULL;
    if (piece < 0 || piece % (4 * LANES) != 0) {
        PyErr_SetString(PyExc_ValueError, "normal_axpy_jobs: piece must be 0 or a positive multiple of 4*LANES");
        return NULL;
    }
    const uint64_t *q = (const uint64_t *)(uintptr_t)ints_addr;
    const double *f = (const double *)(uintptr_t)floats_addr;
    long long items = 0;
    for (long long j = 0; j < njobs; j++) {
        const int64_t n = (int64_t)q[9 * j + 5];
        if (n < 0 || (int64_t)q[9 * j + 3] < 0 || (int64_t)q[9 * j + 4] < 1) {
            PyErr_SetString(PyExc_ValueError, "normal_axpy_jobs: need n >= 0, col0 >= 0, row_len >= 1");
            return NULL;
        }
        items += piece ? (n + piece - 1) / piece : 1;
    }
    /* item k = (job, offset of its piece) */
    int64_t *table = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(items > 0 ? items : 1));
    if (table == NULL)
        return PyErr_NoMemory();
    long long k = 0;
    for (long long j = 0; j < njobs; j++) {
        const int64_t n = (int64_t)q[9 * j + 5];
        if (!piece) {
            table[2 * k] = j;
            table[2 * k + 1] = 0;
            k++;
            continue;
        }
        for (int64_t s = 0; s < n; s += piece, k++) {
            table[2 * k] = j;
            table[2 * k + 1] = s;
        }
    }
    if (threads < 1)
        threads = 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static, 1) num_threads(threads) if (threads > 1 && items > 1)
    for (long long i = 0; i < items; i++) {
        const int64_t j = table[2 * i], s = table[2 * i + 1];
        const uint64_t *a = q + 9 * j;
        const int64_t n = (int64_t)a[5], len = piece && n - s > piece ? piece : n - s;
        const float *src = (const float *)(uintptr_t)a[1];
        normal_axpy((float *)(uintptr_t)a[0] + s, src ? src + s : NULL, (float)f[2 * j],
                    (const float *)(uintptr_t)a[2], (float)f[2 * j + 1], (int64_t)a[3] + s, (int64_t)a[4],
                    len, a[6] + (uint64_t)(s / 4), a[7], a[8]);
    }
    Py_END_ALLOW_THREADS
    free(table);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"philox4x32_10", py_philox4x32_10, METH_VARARGS, "One Philox4x32-10 block: (counter[4], key[2]) -> 4 words."},
    {"normal_axpy_jobs", py_normal_axpy_jobs, METH_VARARGS,
     "normal_axpy_jobs(ints, floats, njobs, threads[, piece]): many normal_axpy jobs on OpenMP threads"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};

PyMODINIT_FUNC PyInit__philox(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "LANES", LANES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
