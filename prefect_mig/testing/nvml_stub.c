/*
 * A stand-in libnvidia-ml.so.1 for CI: the NVML functions prefect-mig's GPU backend calls, with
 * nvml.h's exact C prototypes, over simulated MIG GPUs. The real pynvml loads it, so its ctypes
 * marshalling (what goes by value, what by pointer, which versioned symbol) runs as on a GPU host.
 *
 * The hardware comes from a text file written by prefect_mig/testing/nvml_stub.py from the MIG
 * catalog (the same placement tables as the Python simulation), named by stubConfigure() before
 * nvmlInit. State lives in this process only. Functions named stub* are test hooks, not NVML:
 * processes on a MIG device, a non-process holder of a GPU instance (DCGM), a non-root caller,
 * PIDs hidden by a PID namespace, and "fail the next call of F with code C".
 *
 * With MIG mode off the reads answer as seen on a real H100 80GB HBM3, driver 580.159.04, 2026-11-27:
 * profile info, placements and remaining capacity as with MIG on, nvmlDeviceGetGpuInstances a count
 * of 0, nvmlDeviceGetGpuInstanceById and nvmlDeviceGetMigDeviceHandleByIndex NOT_FOUND,
 * nvmlDeviceGetMaxMigDeviceCount 0. Creating a GPU instance is NOT_SUPPORTED then (nvml.h).
 *
 * Built with -DSTUB_OLD_DRIVER it lacks nvmlDeviceGetComputeRunningProcesses_v3, like a driver
 * older than the installed pynvml (pynvml then raises NVMLLibraryMismatchError).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_INSUFFICIENT_RESOURCES = 23, NVML_ERROR_IN_USE = 19,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct { unsigned int start, size; } nvmlGpuInstancePlacement_t;
typedef struct { unsigned int start, size; } nvmlComputeInstancePlacement_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int version, id, isP2pSupported, sliceCount, instanceCount, multiprocessorCount,
        copyEngineCount, decoderCount, encoderCount, jpegCount, ofaCount;
    unsigned long long memorySizeMB;
    char name[96];
} nvmlGpuInstanceProfileInfo_v2_t;
typedef struct {
    unsigned int version, id, sliceCount, instanceCount, multiprocessorCount, sharedCopyEngineCount,
        sharedDecoderCount, sharedEncoderCount, sharedJpegCount, sharedOfaCount;
    char name[96];
} nvmlComputeInstanceProfileInfo_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define TAG_GPU 0x47505530u
#define TAG_GI 0x47494e53u
#define TAG_CI 0x43494e53u
#define MAX_GPUS 8
#define MAX_PROFILES 16
#define MAX_GIS 1024 /* slots are never reused, so a destroyed instance's handle stays stale */
#define MAX_CIS 8
#define MAX_PROCS 8

struct profile {
    unsigned int enumv, id, slices, count, reported, sm, media, size, nstarts, starts[8];
    unsigned int engines[5]; /* copy, decoder, encoder, JPEG, OFA: what the profile info reports */
    unsigned long long mem;
    char name[32];
};
struct gpu {
    unsigned int tag, mig, pending, max_mig, pci_device_id;
    unsigned long long total_mib;
    int nprof;
    struct profile prof[MAX_PROFILES];
    char uuid[96], name[96];
};
struct ci {
    unsigned int tag, alive, id, profile, slices, start, nproc, pids[MAX_PROCS];
    unsigned long long mem[MAX_PROCS];
    int gi;
    char uuid[96];
};
struct gi {
    unsigned int tag, alive, id, start, held;
    int gpu;
    struct profile *p;
    struct ci ci[MAX_CIS];
};
typedef struct gpu *nvmlDevice_t; /* a MIG device handle is a struct ci * cast to this */
typedef struct gi *nvmlGpuInstance_t;
typedef struct ci *nvmlComputeInstance_t;

static struct gpu gpus[MAX_GPUS];
static struct gi gis[MAX_GIS];
static int ngpus, ngis, initialized, nonroot, hide_pids, uuid_serial;
static char driver[80] = "570.133.20", config_path[4096];
static struct { char fn[80]; int code, times; } faults[16];

/* ------------------------------------------------------------------ test hooks */

int stubConfigure(const char *path) {
    snprintf(config_path, sizeof config_path, "%.4095s", path);
    return 0;
}
void stubSetNonRoot(int on) { nonroot = on; }
void stubHidePids(int on) { hide_pids = on; }
void stubFailNext(const char *fn, int code, int times) {
    for (int i = 0; i < 16; i++)
        if (!faults[i].times) {
            snprintf(faults[i].fn, sizeof faults[i].fn, "%.79s", fn);
            faults[i].code = code;
            faults[i].times = times;
            return;
        }
}

static struct ci *ci_by_uuid(const char *uuid) {
    for (int g = 0; g < ngis; g++)
        for (int c = 0; c < MAX_CIS; c++)
            if (gis[g].alive && gis[g].ci[c].alive && !strcmp(gis[g].ci[c].uuid, uuid)) return &gis[g].ci[c];
    return NULL;
}
int stubAttachProcess(const char *mig_uuid, unsigned int pid, unsigned long long used_bytes) {
    struct ci *ci = ci_by_uuid(mig_uuid);
    if (!ci || ci->nproc == MAX_PROCS) return -1;
    ci->pids[ci->nproc] = pid;
    ci->mem[ci->nproc++] = used_bytes;
    return 0;
}
int stubDetachProcess(const char *mig_uuid, unsigned int pid) {
    struct ci *ci = ci_by_uuid(mig_uuid);
    if (!ci) return -1;
    for (unsigned i = 0; i < ci->nproc; i++)
        if (ci->pids[i] == pid) {
            ci->pids[i] = ci->pids[--ci->nproc];
            ci->mem[i] = ci->mem[ci->nproc];
            return 0;
        }
    return -1;
}
/* A non-process NVML client (DCGM, dcgm-exporter) holding the GPU instance: destroying it or its
 * compute instances is IN_USE, yet no process is listed. */
int stubHoldGpuInstance(unsigned int gpu, unsigned int gi_id, int on) {
    for (int g = 0; g < ngis; g++)
        if (gis[g].alive && gis[g].gpu == (int)gpu && gis[g].id == gi_id) {
            gis[g].held = on;
            return 0;
        }
    return -1;
}

static int fault(const char *fn) {
    for (int i = 0; i < 16; i++)
        if (faults[i].times && !strcmp(faults[i].fn, fn)) {
            faults[i].times--;
            return faults[i].code;
        }
    return 0;
}
/* Calls that would change the GPU (create, destroy, MIG mode), counted: doctor must make none. */
static int mutations;
int stubMutations(void) { return mutations; }

#define ENTER(privileged)                                             \
    do {                                                              \
        if (!initialized) return NVML_ERROR_UNINITIALIZED;            \
        int injected_ = fault(__func__);                              \
        if (injected_) return injected_;                              \
        if ((privileged) && nonroot) return NVML_ERROR_NO_PERMISSION; \
    } while (0)
#define MUTATE(privileged) \
    ENTER(privileged);     \
    mutations++

/* ------------------------------------------------------------------ configuration */

static struct profile *profile_by_id(struct gpu *g, unsigned id);
static struct gi *new_gi(int gpu, struct profile *p, unsigned start);
static struct ci *new_ci(struct gi *gi, unsigned profile, unsigned slices);

/* The hardware file; without stubConfigure, NVML_STUB_CONFIG names it (so a subprocess run with
 * LD_LIBRARY_PATH=<stub dir> loads it), and NVML_STUB_NONROOT / NVML_STUB_HIDE_PIDS set the faults. */
static int load_config(void) {
    if (!config_path[0] && getenv("NVML_STUB_CONFIG"))
        snprintf(config_path, sizeof config_path, "%.4095s", getenv("NVML_STUB_CONFIG"));
    if (getenv("NVML_STUB_NONROOT")) nonroot = atoi(getenv("NVML_STUB_NONROOT"));
    if (getenv("NVML_STUB_HIDE_PIDS")) hide_pids = atoi(getenv("NVML_STUB_HIDE_PIDS"));
    FILE *f = fopen(config_path, "r");
    if (!f) return NVML_ERROR_UNKNOWN;
    char line[1024];
    ngpus = ngis = 0;
    memset(gpus, 0, sizeof gpus);
    memset(gis, 0, sizeof gis);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        int used = 0;
        if (!strncmp(line, "driver ", 7)) {
            snprintf(driver, sizeof driver, "%.79s", line + 7);
        } else if (!strncmp(line, "gpu ", 4) && ngpus < MAX_GPUS) {
            struct gpu *g = &gpus[ngpus++];
            g->tag = TAG_GPU;
            if (sscanf(line, "gpu %95s %u %u %llu %u %x %n", g->uuid, &g->mig, &g->pending, &g->total_mib,
                       &g->max_mig, &g->pci_device_id, &used) < 6)
                goto bad;
            snprintf(g->name, sizeof g->name, "%.95s", line + used);
        } else if (!strncmp(line, "profile ", 8) && ngpus && gpus[ngpus - 1].nprof < MAX_PROFILES) {
            struct gpu *g = &gpus[ngpus - 1];
            struct profile *p = &g->prof[g->nprof++];
            unsigned *e = p->engines;
            if (sscanf(line, "profile %u %u %u %u %u %u %u %u %u %u %u %u %llu %u %u %n", &p->enumv, &p->id,
                       &p->slices, &p->count, &p->reported, &p->sm, &p->media, &e[0], &e[1], &e[2], &e[3], &e[4],
                       &p->mem, &p->size, &p->nstarts, &used) < 15 || p->nstarts > 8)
                goto bad;
            char *rest = line + used;
            for (unsigned i = 0; i < p->nstarts; i++) p->starts[i] = (unsigned)strtoul(rest, &rest, 10);
            sscanf(rest, "%31s", p->name);
        } else if (!strncmp(line, "instance ", 9) && ngpus) { /* an instance present at load */
            unsigned id, start;
            struct profile *p;
            if (sscanf(line, "instance %u %u", &id, &start) < 2 || !(p = profile_by_id(&gpus[ngpus - 1], id)))
                goto bad;
            static const unsigned ci_enum[9] = {0, 0, 1, 2, 3, 0, 6, 4, 5}; /* slices -> CI profile */
            new_ci(new_gi(ngpus - 1, p, start), ci_enum[p->slices], p->slices);
        }
    }
    fclose(f);
    return NVML_SUCCESS;
bad:
    fclose(f);
    return NVML_ERROR_UNKNOWN;
}

/* ------------------------------------------------------------------ handles */

static struct gpu *as_gpu(nvmlDevice_t d) {
    for (int i = 0; i < ngpus; i++)
        if (d == &gpus[i]) return d;
    return NULL;
}
static struct ci *as_ci(const void *h) {
    for (int g = 0; g < ngis; g++)
        for (int c = 0; c < MAX_CIS; c++)
            if (h == &gis[g].ci[c]) return gis[g].alive && gis[g].ci[c].alive ? &gis[g].ci[c] : NULL;
    return NULL;
}
static struct gi *as_gi(nvmlGpuInstance_t h) {
    for (int g = 0; g < ngis; g++)
        if (h == &gis[g]) return gis[g].alive ? h : NULL;
    return NULL;
}
static struct profile *profile_by_id(struct gpu *g, unsigned id) {
    for (int i = 0; i < g->nprof; i++)
        if (g->prof[i].id == id) return &g->prof[i];
    return NULL;
}
static int gpu_index(struct gpu *g) { return (int)(g - gpus); }

/* The driver reads *placement; a struct passed by value arrives as its bytes in the pointer's
 * register (start=4,size=4 -> 0x400000004). Real NVML segfaults there; the stub checks the address
 * is readable (write(2) to a pipe fails with EFAULT if not) and refuses, so the test fails cleanly. */
static int readable(const void *p, size_t n) {
    int fds[2];
    if (pipe(fds)) return 0;
    ssize_t w = write(fds[1], p, n);
    int ok = w == (ssize_t)n;
    close(fds[0]);
    close(fds[1]);
    return ok;
}

/* ------------------------------------------------------------------ library */

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient Resources";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    int injected = fault(__func__);
    if (injected) return injected;
    if (!initialized) {
        int rc = load_config();
        if (rc) return rc;
    }
    initialized++;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    initialized--; /* state is kept: a later nvmlInit sees the same hardware */
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER(0);
    if (!version || length < strlen(driver) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(version, driver);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ devices */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    ENTER(0);
    if (!deviceCount) return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = (unsigned)ngpus;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    ENTER(0);
    if (index >= (unsigned)ngpus || !device) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}
static nvmlReturn_t copy_text(char *out, unsigned int length, const char *text) {
    if (!out || length < strlen(text) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    struct ci *ci = g ? NULL : as_ci(device);
    if (!g && !ci) return NVML_ERROR_INVALID_ARGUMENT;
    if (g) return copy_text(name, length, g->name);
    char buf[160];
    snprintf(buf, sizeof buf, "%s MIG %s", gpus[gis[ci->gi].gpu].name, gis[ci->gi].p->name);
    return copy_text(name, length, buf);
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    struct ci *ci = g ? NULL : as_ci(device);
    if (!g && !ci) return NVML_ERROR_INVALID_ARGUMENT;
    return copy_text(uuid, length, g ? g->uuid : ci->uuid);
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    struct ci *ci = g ? NULL : as_ci(device);
    if ((!g && !ci) || !memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = (g ? g->total_mib : gis[ci->gi].p->mem) * 1024ull * 1024ull;
    memory->used = 0;
    memory->free = memory->total;
    return NVML_SUCCESS;
}
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    if (!g || !pci) return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    pci->bus = (unsigned)gpu_index(g) + 1;
    pci->pciDeviceId = g->pci_device_id;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    if (!g || !currentMode || !pendingMode) return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->nprof) return NVML_ERROR_NOT_SUPPORTED; /* a GPU without MIG */
    *currentMode = g->mig;
    *pendingMode = g->pending;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceSetMigMode(nvmlDevice_t device, unsigned int mode, nvmlReturn_t *activationStatus) {
    MUTATE(1);
    struct gpu *g = as_gpu(device);
    if (!g || mode > 1 || !activationStatus) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < ngis && mode == 0; i++)
        if (gis[i].alive && gis[i].gpu == gpu_index(g)) return NVML_ERROR_IN_USE;
    g->mig = g->pending = mode;
    *activationStatus = NVML_SUCCESS;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    ENTER(0);
    if (!isMigDevice) return NVML_ERROR_INVALID_ARGUMENT;
    *isMigDevice = as_ci(device) != NULL;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ GPU-instance profiles */

#define CHECK(expr)                             \
    do {                                        \
        nvmlReturn_t rc_ = (expr);              \
        if (rc_ != NVML_SUCCESS) return rc_;    \
    } while (0)

/* A GPU that has MIG: reads of its geometry and instances answer whatever its MIG mode. */
static nvmlReturn_t mig_capable_gpu(nvmlDevice_t device, struct gpu **out) {
    struct gpu *g = as_gpu(device);
    if (!g) return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->nprof) return NVML_ERROR_NOT_SUPPORTED;
    *out = g;
    return NVML_SUCCESS;
}
/* A profile id of a GPU that has MIG, and the caller's output pointer `out`: INVALID_ARGUMENT for an
 * id the GPU lacks or a NULL `out`, whatever the MIG mode. */
static nvmlReturn_t gpu_profile(nvmlDevice_t device, unsigned int id, const void *out, struct gpu **g,
                                struct profile **p) {
    CHECK(mig_capable_gpu(device, g));
    *p = profile_by_id(*g, id);
    return *p && out ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}
/* A GPU with MIG mode on: creating an instance needs it. */
static nvmlReturn_t mig_gpu(nvmlDevice_t device, struct gpu **out) {
    struct gpu *g = as_gpu(device);
    if (!g) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig != 1) return NVML_ERROR_NOT_SUPPORTED;
    *out = g;
    return NVML_SUCCESS;
}

/* GPU-instance profile enums the driver knows: 580.159.04 answers INVALID_ARGUMENT from 17 on. */
#define PROFILE_ENUMS 17u

nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile,
                                                  nvmlGpuInstanceProfileInfo_v2_t *info) {
    ENTER(0);
    struct gpu *g;
    CHECK(mig_capable_gpu(device, &g));
    if (!info || info->version != 0x02000098u || profile >= PROFILE_ENUMS) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < g->nprof; i++) {
        struct profile *p = &g->prof[i];
        if (p->enumv != profile) continue;
        info->id = p->id;
        info->isP2pSupported = 0;
        info->sliceCount = p->slices;
        info->instanceCount = p->reported; /* may differ from the real limit, as on A30 */
        info->multiprocessorCount = p->sm;
        info->copyEngineCount = p->engines[0];
        info->decoderCount = p->engines[1];
        info->encoderCount = p->engines[2];
        info->jpegCount = p->engines[3];
        info->ofaCount = p->engines[4];
        info->memorySizeMB = p->mem;
        snprintf(info->name, sizeof info->name, "MIG %s", p->name);
        return NVML_SUCCESS;
    }
    return NVML_ERROR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetGpuInstancePossiblePlacements_v2(nvmlDevice_t device, unsigned int profileId,
                                                           nvmlGpuInstancePlacement_t *placements,
                                                           unsigned int *count) {
    ENTER(1);
    struct gpu *g;
    struct profile *p;
    CHECK(gpu_profile(device, profileId, count, &g, &p));
    if (!placements) {
        *count = p->nstarts;
        return NVML_SUCCESS;
    }
    if (*count < p->nstarts) {
        *count = p->nstarts;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < p->nstarts; i++) {
        placements[i].start = p->starts[i];
        placements[i].size = p->size;
    }
    *count = p->nstarts;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ GPU instances */

static unsigned long long occupied(int gpu) {
    unsigned long long mask = 0;
    for (int i = 0; i < ngis; i++)
        if (gis[i].alive && gis[i].gpu == gpu) mask |= ((1ull << gis[i].p->size) - 1) << gis[i].start;
    return mask;
}

/* On GPU `gpu`: how many instances of `p` exist, and whether any instance holds the media engines. */
static void taken(int gpu, const struct profile *p, unsigned *same, unsigned *media) {
    *same = *media = 0;
    for (int i = 0; i < ngis; i++)
        if (gis[i].alive && gis[i].gpu == gpu) {
            *same += gis[i].p->id == p->id;
            *media |= gis[i].p->media;
        }
}

/* How many more instances of the profile fit, placing greedily from the lowest free start. */
nvmlReturn_t nvmlDeviceGetGpuInstanceRemainingCapacity(nvmlDevice_t device, unsigned int profileId,
                                                       unsigned int *count) {
    ENTER(1);
    struct gpu *g;
    struct profile *p;
    CHECK(gpu_profile(device, profileId, count, &g, &p));
    int gpu = gpu_index(g);
    unsigned long long mask = occupied(gpu);
    unsigned same, media, n = 0;
    taken(gpu, p, &same, &media);
    for (unsigned i = 0; i < p->nstarts; i++) {
        unsigned long long bits = ((1ull << p->size) - 1) << p->starts[i];
        if ((mask & bits) || same + n >= p->count || (p->media && (media || n))) continue;
        mask |= bits;
        n++;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceCreateGpuInstanceWithPlacement(nvmlDevice_t device, unsigned int profileId,
                                                      const nvmlGpuInstancePlacement_t *placement,
                                                      nvmlGpuInstance_t *gpuInstance) {
    MUTATE(1);
    struct gpu *g;
    CHECK(mig_gpu(device, &g));
    struct profile *p = profile_by_id(g, profileId);
    if (!p || !gpuInstance) return NVML_ERROR_INVALID_ARGUMENT;
    if (!readable(placement, sizeof *placement)) {
        fprintf(stderr, "nvml stub: placement pointer %p is not readable: was the struct passed by value?\n",
                (const void *)placement);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    int ok = 0;
    for (unsigned i = 0; i < p->nstarts; i++) ok |= p->starts[i] == placement->start;
    if (!ok || placement->size != p->size) return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = gpu_index(g);
    if (occupied(gpu) & (((1ull << p->size) - 1) << placement->start)) return NVML_ERROR_INSUFFICIENT_RESOURCES;
    unsigned same, media;
    taken(gpu, p, &same, &media);
    if (same >= p->count) return NVML_ERROR_INSUFFICIENT_RESOURCES;
    if (media && p->media) return NVML_ERROR_INSUFFICIENT_RESOURCES;
    if (ngis == MAX_GIS) return NVML_ERROR_INSUFFICIENT_RESOURCES;
    *gpuInstance = new_gi(gpu, p, placement->start);
    return NVML_SUCCESS;
}
static struct gi *new_gi(int gpu, struct profile *p, unsigned start) {
    unsigned used_ids = 0;
    for (int i = 0; i < ngis; i++)
        if (gis[i].alive && gis[i].gpu == gpu) used_ids |= 1u << gis[i].id;
    struct gi *gi = &gis[ngis++];
    memset(gi, 0, sizeof *gi);
    gi->tag = TAG_GI;
    gi->alive = 1;
    gi->gpu = gpu;
    gi->p = p;
    gi->start = start;
    for (gi->id = 1; used_ids & (1u << gi->id); gi->id++) {}
    return gi;
}
nvmlReturn_t nvmlGpuInstanceDestroy(nvmlGpuInstance_t gpuInstance) {
    MUTATE(1);
    struct gi *gi = as_gi(gpuInstance);
    if (!gi) return NVML_ERROR_INVALID_ARGUMENT;
    if (gi->held) return NVML_ERROR_IN_USE;
    for (int c = 0; c < MAX_CIS; c++)
        if (gi->ci[c].alive) return NVML_ERROR_IN_USE;
    gi->alive = 0;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetGpuInstances(nvmlDevice_t device, unsigned int profileId, nvmlGpuInstance_t *gpuInstances,
                                       unsigned int *count) {
    ENTER(1);
    struct gpu *g;
    CHECK(mig_capable_gpu(device, &g));
    struct profile *p = profile_by_id(g, profileId);
    if (!p || !count || !gpuInstances) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int i = 0; i < ngis; i++)
        if (gis[i].alive && gis[i].gpu == gpu_index(g) && gis[i].p == p) gpuInstances[n++] = &gis[i];
    *count = n;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id, nvmlGpuInstance_t *gpuInstance) {
    ENTER(1);
    struct gpu *g;
    CHECK(mig_capable_gpu(device, &g));
    if (!gpuInstance) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < ngis; i++)
        if (gis[i].alive && gis[i].gpu == gpu_index(g) && gis[i].id == id) {
            *gpuInstance = &gis[i];
            return NVML_SUCCESS;
        }
    return NVML_ERROR_NOT_FOUND;
}
typedef struct {
    nvmlDevice_t device;
    unsigned int id, profileId;
    nvmlGpuInstancePlacement_t placement;
} nvmlGpuInstanceInfo_t;
nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info) {
    ENTER(0);
    struct gi *gi = as_gi(gpuInstance);
    if (!gi || !info) return NVML_ERROR_INVALID_ARGUMENT;
    info->device = &gpus[gi->gpu];
    info->id = gi->id;
    info->profileId = gi->p->id;
    info->placement.start = gi->start;
    info->placement.size = gi->p->size;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ compute instances */

/* CI profile enum -> compute slices (NVML_COMPUTE_INSTANCE_PROFILE_1/2/3/4/7/8/6_SLICE) */
static const int ci_slices[] = {1, 2, 3, 4, 7, 8, 6};

static int ci_profile_slices(struct gi *gi, unsigned int profile) {
    if (profile >= sizeof ci_slices / sizeof *ci_slices) return 0;
    int n = ci_slices[profile], whole = (int)gi->p->slices;
    /* a CI over the whole GI, and 1c/2c (3c/4c on a 7g) sub-divisions */
    return n == whole || (n < whole && (n <= 2 || (whole >= 7 && n <= 4))) ? n : 0;
}

nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfoV(nvmlGpuInstance_t gpuInstance, unsigned int profile,
                                                           unsigned int engProfile,
                                                           nvmlComputeInstanceProfileInfo_v2_t *info) {
    ENTER(0);
    struct gi *gi = as_gi(gpuInstance);
    if (!gi || !info || info->version != 0x02000088u) return NVML_ERROR_INVALID_ARGUMENT;
    int n = engProfile == 0 ? ci_profile_slices(gi, profile) : 0;
    if (!n) return NVML_ERROR_NOT_SUPPORTED;
    info->id = profile;
    info->sliceCount = (unsigned)n;
    info->instanceCount = gi->p->slices / (unsigned)n;
    info->multiprocessorCount = gi->p->sm * (unsigned)n / gi->p->slices;
    info->sharedCopyEngineCount = info->sharedDecoderCount = info->sharedEncoderCount = 0;
    info->sharedJpegCount = info->sharedOfaCount = 0;
    snprintf(info->name, sizeof info->name, "%dc.%s", n, gi->p->name);
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlGpuInstanceCreateComputeInstance(nvmlGpuInstance_t gpuInstance, unsigned int profileId,
                                                  nvmlComputeInstance_t *computeInstance) {
    MUTATE(1);
    struct gi *gi = as_gi(gpuInstance);
    if (!gi || !computeInstance) return NVML_ERROR_INVALID_ARGUMENT;
    int n = ci_profile_slices(gi, profileId);
    if (!n) return NVML_ERROR_NOT_SUPPORTED;
    unsigned used = 0;
    int slot = -1;
    for (int c = 0; c < MAX_CIS; c++) {
        if (gi->ci[c].alive) used += gi->ci[c].slices;
        else if (slot < 0) slot = c;
    }
    if (slot < 0 || used + (unsigned)n > gi->p->slices) return NVML_ERROR_INSUFFICIENT_RESOURCES;
    *computeInstance = new_ci(gi, profileId, (unsigned)n);
    return NVML_SUCCESS;
}
static struct ci *new_ci(struct gi *gi, unsigned profile, unsigned slices) {
    unsigned used = 0;
    int slot = -1;
    for (int c = 0; c < MAX_CIS; c++) {
        if (gi->ci[c].alive) used += gi->ci[c].slices;
        else if (slot < 0) slot = c;
    }
    struct ci *ci = &gi->ci[slot];
    memset(ci, 0, sizeof *ci);
    ci->tag = TAG_CI;
    ci->alive = 1;
    ci->id = (unsigned)slot;
    ci->profile = profile;
    ci->slices = slices;
    ci->start = used;
    ci->gi = (int)(gi - gis);
    snprintf(ci->uuid, sizeof ci->uuid, "MIG-5dfa0000-0000-4000-8000-%012x", ++uuid_serial);
    return ci;
}
nvmlReturn_t nvmlComputeInstanceDestroy(nvmlComputeInstance_t computeInstance) {
    MUTATE(1);
    struct ci *ci = as_ci(computeInstance);
    if (!ci) return NVML_ERROR_INVALID_ARGUMENT;
    if (ci->nproc || gis[ci->gi].held) return NVML_ERROR_IN_USE;
    ci->alive = 0;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlGpuInstanceGetComputeInstances(nvmlGpuInstance_t gpuInstance, unsigned int profileId,
                                                nvmlComputeInstance_t *computeInstances, unsigned int *count) {
    ENTER(1);
    struct gi *gi = as_gi(gpuInstance);
    if (!gi || !count || !computeInstances) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int c = 0; c < MAX_CIS; c++)
        if (gi->ci[c].alive && gi->ci[c].profile == profileId) computeInstances[n++] = &gi->ci[c];
    *count = n;
    return NVML_SUCCESS;
}
typedef struct {
    nvmlDevice_t device;
    nvmlGpuInstance_t gpuInstance;
    unsigned int id, profileId;
    nvmlComputeInstancePlacement_t placement;
} nvmlComputeInstanceInfo_t;
nvmlReturn_t nvmlComputeInstanceGetInfo_v2(nvmlComputeInstance_t computeInstance, nvmlComputeInstanceInfo_t *info) {
    ENTER(0);
    struct ci *ci = as_ci(computeInstance);
    if (!ci || !info) return NVML_ERROR_INVALID_ARGUMENT;
    info->device = &gpus[gis[ci->gi].gpu];
    info->gpuInstance = &gis[ci->gi];
    info->id = ci->id;
    info->profileId = ci->profile;
    info->placement.start = ci->start;
    info->placement.size = ci->slices;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ MIG devices and processes */

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    if (!g || !count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = g->mig == 1 ? g->max_mig : 0;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *migDevice) {
    ENTER(0);
    struct gpu *g;
    CHECK(mig_capable_gpu(device, &g));
    if (index >= g->max_mig || !migDevice) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (unsigned id = 1; id < 32; id++) /* by GPU-instance id, then compute-instance id */
        for (int i = 0; i < ngis; i++)
            if (gis[i].alive && gis[i].gpu == gpu_index(g) && gis[i].id == id)
                for (int c = 0; c < MAX_CIS; c++)
                    if (gis[i].ci[c].alive && n++ == index) {
                        *migDevice = (nvmlDevice_t)(void *)&gis[i].ci[c];
                        return NVML_SUCCESS;
                    }
    return NVML_ERROR_NOT_FOUND;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    ENTER(0);
    struct ci *ci = as_ci(device);
    if (!ci || !id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = gis[ci->gi].id;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    ENTER(0);
    struct ci *ci = as_ci(device);
    if (!ci || !id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = ci->id;
    return NVML_SUCCESS;
}

#ifndef STUB_OLD_DRIVER
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos) {
    ENTER(0);
    struct gpu *g = as_gpu(device);
    struct ci *one = g ? NULL : as_ci(device);
    if ((!g && !one) || !infoCount) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int i = 0; i < ngis; i++)
        for (int c = 0; c < MAX_CIS; c++) {
            struct ci *ci = &gis[i].ci[c];
            if (!gis[i].alive || !ci->alive || (one ? ci != one : gis[i].gpu != gpu_index(g))) continue;
            for (unsigned k = 0; k < ci->nproc && !hide_pids; k++) {
                if (infos && n < *infoCount) {
                    infos[n].pid = ci->pids[k];
                    infos[n].usedGpuMemory = ci->mem[k];
                    infos[n].gpuInstanceId = gis[i].id;
                    infos[n].computeInstanceId = ci->id;
                }
                n++;
            }
        }
    nvmlReturn_t rc = n > *infoCount || (n && !infos) ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *infoCount = n;
    return rc;
}
#endif
