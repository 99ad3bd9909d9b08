// Self-check for fake_cublaslt.cpp, built together with it:
//   g++ -std=c++17 -O2 -ffp-contract=off emu/test_cublaslt.cpp emu/fake_cublaslt.cpp -o /tmp/t && /tmp/t
// Each case is checked twice: against a double-precision reference (error relative to the
// magnitude of the summed terms, so cancellation does not inflate it) and bit for bit against
// a plain f32 loop, which is the accumulation order the emulation promises.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

// Local mirror of the C API as cudarc binds it: enums are 32-bit, handles opaque pointers.
extern "C" {
typedef void* Handle;
int32_t cublasLtCreate(Handle*);
int32_t cublasLtDestroy(Handle);
int32_t cublasLtMatmulDescCreate(Handle*, int32_t compute, int32_t scale);
int32_t cublasLtMatmulDescDestroy(Handle);
int32_t cublasLtMatmulDescSetAttribute(Handle, int32_t attr, const void* buf, size_t size);
int32_t cublasLtMatrixLayoutCreate(Handle*, int32_t type, uint64_t rows, uint64_t cols, int64_t ld);
int32_t cublasLtMatrixLayoutDestroy(Handle);
int32_t cublasLtMatrixLayoutSetAttribute(Handle, int32_t attr, const void* buf, size_t size);
int32_t cublasLtMatmulPreferenceCreate(Handle*);
int32_t cublasLtMatmulPreferenceDestroy(Handle);
int32_t cublasLtMatmulPreferenceSetAttribute(Handle, int32_t attr, const void* buf, size_t size);
int32_t cublasLtMatmulAlgoGetHeuristic(Handle, Handle desc, Handle a, Handle b, Handle c, Handle d, Handle pref,
                                       int requested, void* results, int* count);
int32_t cublasLtMatmul(Handle, Handle desc, const void* alpha, const void* A, Handle a, const void* B, Handle b,
                       const void* beta, const void* C, Handle c, void* D, Handle d, const void* algo, void* ws,
                       size_t ws_size, void* stream);
}

struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
    uint64_t algo[8];
    size_t workspaceSize;
    int32_t state;
    float wavesCount;
    int32_t reserved[4];
};

enum { SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_16F = 64, COMPUTE_32F = 68 };
enum { TRANSA = 3, TRANSB = 4, EPILOGUE = 7, BIAS_POINTER = 8, BIAS_DATA_TYPE = 26 };
enum { EPI_DEFAULT = 1, EPI_RELU = 2, EPI_BIAS = 4 };
enum { LAYOUT_ORDER = 1, LAYOUT_BATCH_COUNT = 5 };
enum { PREF_MAX_WORKSPACE_BYTES = 1, PREF_MIN_ALIGNMENT_A_BYTES = 5 };

static int failures = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fprintf(stderr, "\n");                         \
            ++failures;                                    \
        }                                                  \
    } while (0)

static float bf2f(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Independent RNE: via the exact tie test rather than the add-and-shift trick.
static uint16_t f2bf(float f) {
    if (std::isnan(f)) return 0x7fc0;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t hi = u >> 16, lo = u & 0xffff;
    if (lo > 0x8000 || (lo == 0x8000 && (hi & 1))) ++hi;
    return uint16_t(hi);
}

// A column-major matrix stored as raw bytes of f32 or bf16.
struct Mat {
    int type;
    size_t rows, cols, ld;
    std::vector<uint8_t> bytes;
    size_t esz() const { return type == R_32F ? 4 : 2; }
    Mat(int t, size_t r, size_t c, size_t l) : type(t), rows(r), cols(c), ld(l), bytes(esz() * l * c) {}
    float get(size_t i, size_t j) const {
        size_t idx = i + j * ld;
        if (type == R_32F) {
            float f;
            memcpy(&f, &bytes[idx * 4], 4);
            return f;
        }
        uint16_t h;
        memcpy(&h, &bytes[idx * 2], 2);
        return bf2f(h);
    }
    void set(size_t i, size_t j, float v) {
        size_t idx = i + j * ld;
        if (type == R_32F)
            memcpy(&bytes[idx * 4], &v, 4);
        else {
            uint16_t h = f2bf(v);
            memcpy(&bytes[idx * 2], &h, 2);
        }
    }
    void fill(std::mt19937_64& rng, float scale) {
        std::uniform_real_distribution<float> u(-scale, scale);
        // Padding between columns gets a sentinel so a wrong ld shows up.
        for (size_t j = 0; j < cols; ++j)
            for (size_t i = 0; i < ld; ++i) set(i, j, i < rows ? u(rng) : 1e30f);
    }
};

struct Case {
    int transa, transb, atype, btype, ctype, dtype;
    bool bias;
    int bias_type;
    float alpha, beta;
    size_t M, N, K;
    size_t pad;          // extra leading-dimension padding
    bool in_place;       // C and D are the same buffer (the accumulate path of gemm.rs)
    bool set_bias_type;  // false: rely on the default (D type)
};

static double worst_f32 = 0, worst_bf16 = 0;

static void run_case(const Case& cs, std::mt19937_64& rng, bool verbose = false) {
    const size_t M = cs.M, N = cs.N, K = cs.K;
    size_t ar = cs.transa ? K : M, ac = cs.transa ? M : K;
    size_t br = cs.transb ? N : K, bc = cs.transb ? K : N;
    Mat A(cs.atype, ar, ac, ar + cs.pad), B(cs.btype, br, bc, br + cs.pad);
    Mat D(cs.dtype, M, N, M + cs.pad);
    Mat C = cs.in_place ? Mat(cs.dtype, M, N, M + cs.pad) : Mat(cs.ctype, M, N, M + 2 * cs.pad);
    A.fill(rng, 1.0f);
    B.fill(rng, 1.0f);
    C.fill(rng, 4.0f);
    if (cs.in_place) D = C;
    else D.fill(rng, 1.0f);
    Mat bias(cs.bias_type, M, 1, M);
    bias.fill(rng, 2.0f);
    if (cs.beta == 0) {  // beta == 0 must ignore C entirely, NaN included
        float nan = std::nanf("");
        for (size_t j = 0; j < N; ++j)
            for (size_t i = 0; i < M; ++i) (cs.in_place ? D : C).set(i, j, nan);
        if (cs.in_place) C = D;
    }
    const Mat C0 = C, D0 = D;

    Handle h, desc, la, lb, lc, ld, pref;
    CHECK(cublasLtCreate(&h) == SUCCESS, "create");
    CHECK(cublasLtMatmulDescCreate(&desc, COMPUTE_32F, R_32F) == SUCCESS, "desc");
    int32_t ta = cs.transa, tb = cs.transb;
    CHECK(cublasLtMatmulDescSetAttribute(desc, TRANSA, &ta, 4) == SUCCESS, "transa");
    CHECK(cublasLtMatmulDescSetAttribute(desc, TRANSB, &tb, 4) == SUCCESS, "transb");
    if (cs.bias) {
        int32_t epi = EPI_BIAS, bt = cs.bias_type;
        CHECK(cublasLtMatmulDescSetAttribute(desc, EPILOGUE, &epi, 4) == SUCCESS, "epilogue");
        if (cs.set_bias_type) CHECK(cublasLtMatmulDescSetAttribute(desc, BIAS_DATA_TYPE, &bt, 4) == SUCCESS, "bt");
    }
    CHECK(cublasLtMatrixLayoutCreate(&la, A.type, A.rows, A.cols, A.ld) == SUCCESS, "la");
    CHECK(cublasLtMatrixLayoutCreate(&lb, B.type, B.rows, B.cols, B.ld) == SUCCESS, "lb");
    CHECK(cublasLtMatrixLayoutCreate(&lc, C.type, C.rows, C.cols, C.ld) == SUCCESS, "lc");
    CHECK(cublasLtMatrixLayoutCreate(&ld, D.type, D.rows, D.cols, D.ld) == SUCCESS, "ld");
    CHECK(cublasLtMatmulPreferenceCreate(&pref) == SUCCESS, "pref");
    uint64_t ws = 32 << 20;
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, &ws, 8) == SUCCESS, "pref attr");
    // The test's buffers are std::vectors: tell the heuristic not to assume more alignment.
    for (int32_t attr = PREF_MIN_ALIGNMENT_A_BYTES; attr < PREF_MIN_ALIGNMENT_A_BYTES + 4; ++attr) {
        uint32_t any = 1;
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &any, 4) == SUCCESS, "alignment attr");
    }
    HeuristicResult hr;
    memset(&hr, 0xff, sizeof hr);
    int count = -1;
    CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, cs.in_place ? ld : lc, ld, pref, 1, &hr, &count) == SUCCESS,
          "heuristic");
    CHECK(count == 1 && hr.state == SUCCESS, "heuristic result count=%d state=%d", count, hr.state);
    CHECK(cublasLtMatmulPreferenceDestroy(pref) == SUCCESS, "pref destroy");
    if (cs.bias) {
        uint64_t p = uint64_t(uintptr_t(bias.bytes.data()));  // as gemm.rs: a u64 device pointer
        CHECK(cublasLtMatmulDescSetAttribute(desc, BIAS_POINTER, &p, 8) == SUCCESS, "bias ptr");
    }
    void* dptr = D.bytes.data();
    const void* cptr = cs.in_place ? dptr : C.bytes.data();
    auto t0 = std::chrono::steady_clock::now();
    int32_t st = cublasLtMatmul(h, desc, &cs.alpha, A.bytes.data(), la, B.bytes.data(), lb, &cs.beta, cptr,
                                cs.in_place ? ld : lc, dptr, ld, &hr.algo, nullptr, ws, nullptr);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(st == SUCCESS, "matmul status %d", st);
    if (verbose)
        printf("  %zux%zux%zu: %.3f s (%.1f GFLOP/s)\n", M, N, K, secs, 2.0 * M * N * K / secs / 1e9);

    // Large cases check a strided sample of outputs to keep the reference cheap.
    size_t step = M * N * K > (64u << 20) ? 97 : 1;
    double worst = 0;
    size_t mismatches = 0;
    for (size_t idx = 0; idx < M * N; idx += step) {
        size_t i = idx % M, j = idx / M;
        double sum = 0, mag = 0;
        float acc = 0.0f;
        for (size_t k = 0; k < K; ++k) {
            float a = cs.transa ? A.get(k, i) : A.get(i, k);
            float b = cs.transb ? B.get(j, k) : B.get(k, j);
            sum += double(a) * double(b);
            mag += std::fabs(double(a) * double(b));
            acc = acc + a * b;
        }
        double ref = double(cs.alpha) * sum;
        mag = std::fabs(double(cs.alpha)) * mag;
        float plain = cs.alpha * acc;
        if (cs.beta != 0) {
            ref += double(cs.beta) * C0.get(i, j);
            mag += std::fabs(double(cs.beta) * C0.get(i, j));
            plain = plain + cs.beta * C0.get(i, j);
        }
        if (cs.bias) {
            ref += bias.get(i, 0);
            mag += std::fabs(bias.get(i, 0));
            plain = plain + bias.get(i, 0);
        }
        float got = D.get(i, j);
        Mat one(cs.dtype, 1, 1, 1);
        one.set(0, 0, plain);
        float plain_rounded = one.get(0, 0);
        double err = std::fabs(got - ref) / (mag + 1e-30);
        if (!(err <= worst)) worst = err;  // NaN propagates into worst
        if (memcmp(&got, &plain_rounded, 4) != 0 && mismatches++ < 3)
            fprintf(stderr, "  bit mismatch at (%zu,%zu): got %.9g, plain loop %.9g\n", i, j, got, plain_rounded);
    }
    // The leading-dimension padding of D must be untouched.
    for (size_t j = 0; j < N; ++j)
        for (size_t i = M; i < D.ld; ++i)
            CHECK(memcmp(&D.bytes[(i + j * D.ld) * D.esz()], &D0.bytes[(i + j * D.ld) * D.esz()], D.esz()) == 0,
                  "ld padding written");
    double tol = cs.dtype == R_32F ? 1e-5 : 1e-2;
    (cs.dtype == R_32F ? worst_f32 : worst_bf16) = std::max(cs.dtype == R_32F ? worst_f32 : worst_bf16, worst);
    CHECK(worst <= tol, "case M=%zu N=%zu K=%zu ta=%d tb=%d dtype=%d bias=%d beta=%g: rel err %.3g > %.0e", M, N,
          K, cs.transa, cs.transb, cs.dtype, cs.bias, cs.beta, worst, tol);
    CHECK(mismatches == 0, "case M=%zu N=%zu K=%zu: %zu outputs differ from the plain f32 loop", M, N, K,
          mismatches);

    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(h);
}

// Unsupported requests must fail with a status, not compute something else.
static void check_rejections() {
    Handle h, desc, la, lb, ld, pref;
    cublasLtCreate(&h);
    CHECK(cublasLtMatmulDescCreate(&desc, COMPUTE_16F, R_32F) == NOT_SUPPORTED, "16F compute accepted");
    CHECK(cublasLtMatmulDescCreate(&desc, COMPUTE_32F, R_16BF) == NOT_SUPPORTED, "bf16 scale accepted");
    cublasLtMatmulDescCreate(&desc, COMPUTE_32F, R_32F);
    int32_t relu = EPI_RELU, row = 1, batch = 2, one = 1, pm_vec = 2, trans_bad = 7;
    CHECK(cublasLtMatmulDescSetAttribute(desc, EPILOGUE, &relu, 4) == NOT_SUPPORTED, "RELU accepted");
    CHECK(cublasLtMatmulDescSetAttribute(desc, 2, &pm_vec, 4) == NOT_SUPPORTED, "vector pointer mode accepted");
    CHECK(cublasLtMatmulDescSetAttribute(desc, TRANSA, &trans_bad, 4) == NOT_SUPPORTED, "bad transa accepted");
    CHECK(cublasLtMatmulDescSetAttribute(desc, TRANSA, &one, 8) == INVALID_VALUE, "wrong attribute size accepted");
    int64_t unknown = 5;
    CHECK(cublasLtMatmulDescSetAttribute(desc, 999, &unknown, 8) == SUCCESS, "unknown attribute rejected");
    cublasLtMatrixLayoutCreate(&la, R_16BF, 8, 4, 8);
    CHECK(cublasLtMatrixLayoutSetAttribute(la, LAYOUT_ORDER, &row, 4) == NOT_SUPPORTED, "ROW order accepted");
    CHECK(cublasLtMatrixLayoutSetAttribute(la, LAYOUT_BATCH_COUNT, &batch, 4) == NOT_SUPPORTED, "batch accepted");
    CHECK(cublasLtMatrixLayoutSetAttribute(la, LAYOUT_BATCH_COUNT, &one, 4) == SUCCESS, "batch 1 rejected");
    cublasLtMatrixLayoutCreate(&lb, R_16F, 8, 3, 8);
    cublasLtMatrixLayoutCreate(&ld, R_32F, 8, 3, 8);
    cublasLtMatmulPreferenceCreate(&pref);
    HeuristicResult hr;
    int count = 7;
    // Default op is N: op(A) is 8x4, B is 8x3 -> K mismatch.
    CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, ld, ld, ld, pref, 1, &hr, &count) == INVALID_VALUE,
          "shape mismatch accepted");
    CHECK(count == 0, "count set on failure");
    int32_t t = 1;
    cublasLtMatmulDescSetAttribute(desc, TRANSA, &t, 4);  // op(A) = 4x8
    Handle ld4;
    cublasLtMatrixLayoutCreate(&ld4, R_32F, 4, 3, 4);
    CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld4, ld4, pref, 1, &hr, &count) == NOT_SUPPORTED,
          "f16 B accepted");
    cublasLtMatrixLayoutDestroy(ld4);
    Handle ld_bad;
    cublasLtMatrixLayoutCreate(&ld_bad, R_32F, 8, 3, 4);
    CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, la, ld_bad, ld_bad, pref, 1, &hr, &count) == INVALID_VALUE,
          "ld < rows accepted");
    cublasLtMatrixLayoutDestroy(ld_bad);
    // An algorithm chosen under the default 256-byte alignment must refuse a pointer with less.
    {
        Handle l16;
        cublasLtMatrixLayoutCreate(&l16, R_32F, 4, 4, 4);  // op(A) = Aᵀ is 4x8, B is 8x4
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, la, l16, l16, pref, 1, &hr, &count) == SUCCESS && count == 1,
              "heuristic for the alignment case");
        alignas(256) static unsigned char buf[1024];
        float alpha = 1, beta = 0;
        CHECK(cublasLtMatmul(h, desc, &alpha, buf, la, buf + 256, la, &beta, buf + 512, l16, buf + 512, l16, &hr.algo,
                             nullptr, 0, nullptr) == SUCCESS,
              "aligned pointers refused");
        CHECK(cublasLtMatmul(h, desc, &alpha, buf + 16, la, buf + 256, la, &beta, buf + 512, l16, buf + 512, l16,
                             &hr.algo, nullptr, 0, nullptr) == INVALID_VALUE,
              "a pointer below the assumed alignment accepted");
        cublasLtMatrixLayoutDestroy(l16);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(h);
}

int main() {
    std::mt19937_64 rng(12345);
    std::uniform_int_distribution<int> dn(1, 70), drows(1, 9), dk(8, 136);
    int cases = 0;
    // gemm.rs usage: W [n,k] (A, col-major k x n, op T), X [rows,k] (B, k x rows, op N),
    // D [rows,n] (col-major n x rows), C == D, bias of D's type.
    for (int it = 0; it < 400; ++it) {
        Case cs{};
        cs.transa = 1;
        cs.transb = 0;
        cs.atype = cs.btype = R_16BF;
        cs.dtype = cs.ctype = (it & 1) ? R_16BF : R_32F;
        cs.bias = (it >> 1) & 1;
        cs.bias_type = cs.dtype;
        cs.set_bias_type = true;
        cs.alpha = 1.0f;
        cs.beta = ((it >> 2) & 1) ? 1.0f : 0.0f;
        cs.M = dn(rng);
        cs.N = drows(rng);
        cs.K = dk(rng);
        cs.in_place = true;
        run_case(cs, rng);
        ++cases;
    }
    // General transposes, ld padding, separate C, alpha/beta != 0/1, mixed types.
    const int types[2] = {R_32F, R_16BF};
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
            for (int rep = 0; rep < 24; ++rep) {
                Case cs{};
                cs.transa = ta == 1 && rep % 5 == 4 ? 2 : ta;  // OP_C is OP_T for real types
                cs.transb = tb;
                bool f32 = rep < 8;
                cs.atype = f32 ? R_32F : types[rep & 1];
                cs.btype = f32 ? R_32F : types[(rep >> 1) & 1];
                cs.ctype = f32 ? R_32F : types[(rep >> 2) & 1];
                cs.dtype = f32 ? R_32F : types[(rep >> 3) & 1];
                cs.bias = rep % 3 != 0;
                cs.bias_type = types[(rep >> 2) & 1];
                cs.set_bias_type = rep % 4 != 1;
                if (!cs.set_bias_type) cs.bias_type = cs.dtype;
                cs.alpha = rep % 2 ? 0.5f : 1.25f;
                cs.beta = rep % 3 == 1 ? 0.0f : -2.0f;
                cs.M = 1 + rng() % 40;
                cs.N = 1 + rng() % 20;
                cs.K = rng() % 50;  // K == 0 included: D = beta*C + bias
                cs.pad = rng() % 4;
                cs.in_place = false;
                run_case(cs, rng);
                ++cases;
            }
    // Multi-threaded path (work above the inline threshold), both output types.
    for (int dt = 0; dt < 2; ++dt) {
        Case cs{1, 0, R_16BF, R_16BF, types[dt], types[dt], true, types[dt], 1.0f, 1.0f, 300, 77, 136, 0, true, true};
        run_case(cs, rng);
        ++cases;
    }
    check_rejections();
    printf("%d cases; worst rel err f32 D %.3g (tol 1e-5), bf16 D %.3g (tol 1e-2); all bit-identical to a plain f32 loop\n",
           cases, worst_f32, worst_bf16);
    printf("timing (gemm.rs shape, bf16 in, f32 out, bias, beta=1):\n");
    Case big{1, 0, R_16BF, R_16BF, R_32F, R_32F, true, R_32F, 1.0f, 1.0f, 2048, 2048, 1024, 0, true, true};
    run_case(big, rng, true);
    if (failures) {
        printf("%d FAILURES\n", failures);
        return 1;
    }
    printf("OK\n");
    return 0;
}
