/* A stand-in for the CUDA runtime library (libcudart), for the ctypes path of trt_device.py on a device without
 * cuda-python (JetPack). "Device" memory is host memory; one device; events hold a clock reading. It counts the
 * events alive (fake_live_events) so that a test can see each timing call destroy its own. Built by the tests
 * with `cc -shared -fPIC`. Nothing here says anything about the real CUDA runtime's behaviour. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int live_events = 0;
int fake_live_events(void) { return live_events; }

const char *cudaGetErrorString(int err) { return err == 2 ? "out of memory" : "fake error"; }
int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
int cudaSetDevice(int d) { return d == 0 ? 0 : 101; }
int cudaDeviceGetAttribute(int *v, int attr, int d) { *v = attr == 75 ? 8 : 7; return 0; }
int cudaRuntimeGetVersion(int *v) { *v = 12060; return 0; }
int cudaDriverGetVersion(int *v) { *v = 12060; return 0; }
int cudaMemGetInfo(size_t *free_, size_t *total) { *free_ = (size_t)4 << 30; *total = (size_t)8 << 30; return 0; }
int cudaMalloc(void **p, size_t n) { if (getenv("FAKE_CUDA_OOM")) return 2; *p = calloc(1, n); return 0; }
int cudaFree(void *p) { free(p); return 0; }
int cudaMallocHost(void **p, size_t n) { *p = calloc(1, n); return 0; }
int cudaFreeHost(void *p) { free(p); return 0; }
int cudaStreamCreate(void **s) { *s = (void *)0x7; return 0; }
int cudaStreamDestroy(void *s) { return 0; }
int cudaStreamSynchronize(void *s) { return 0; }
int cudaMemcpyAsync(void *dst, const void *src, size_t n, int kind, void *s) { memcpy(dst, src, n); return 0; }
int cudaEventCreate(void **e) { *e = calloc(1, sizeof(double)); live_events++; return 0; }
int cudaEventDestroy(void *e) { free(e); live_events--; return 0; }
int cudaEventRecord(void *e, void *s) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    *(double *)e = t.tv_sec * 1e3 + t.tv_nsec / 1e6;
    return 0;
}
int cudaEventSynchronize(void *e) { return 0; }
int cudaEventElapsedTime(float *ms, void *a, void *b) { *ms = (float)(*(double *)b - *(double *)a) + 1e-3f; return 0; }
