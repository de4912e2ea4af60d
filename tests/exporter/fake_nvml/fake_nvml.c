/*
 * A stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * It exports the NVML symbols the exporter reaches through pynvml, with the real ABI (struct
 * layouts, return codes), so the exporter's real ctypes path runs end to end. The GPUs are
 * scripted by an INI-style file named by $FAKE_NVML_SCENARIO, re-read whenever it changes, so
 * a test can lose a GPU, raise an XID or reload the "driver" while the exporter runs:
 *
 *   [system]  driver, cuda, init_error (NVML code returned by nvmlInit), epoch (change it to
 *             invalidate the running session: calls answer UNINITIALIZED until re-init),
 *             hang_init = 1 (nvmlInit blocks until the key is cleared), gpm_sample_limit
 *             (GPM samples that may be allocated at once; beyond it Alloc answers MEMORY)
 *   [gpu]     one section per GPU, in index order; keys below in GPU_KEYS, plus
 *             unsupported = <NVML function names or field:<id>> (answer NOT_SUPPORTED),
 *             fail = <function names> (answer UNKNOWN: an error that comes and goes),
 *             hang = <function names, or *> (the call blocks, without holding the library
 *             lock, until the file no longer names it: a GPU falling off the bus),
 *             lost = 1 (every call answers GPU_IS_LOST; a GPU lost when nvmlInit ran stays
 *             lost for that whole session, as a real driver enumerates GPUs only at init),
 *             procs = pid:bytes,pid:bytes
 *   [mig]     a MIG instance of the preceding GPU: uuid, gi, ci, mem_total, mem_used,
 *             gpm_sm_util, gpm_sm_occupancy, gpm_tensor, gpm_dram, gpm_gr (per-instance GPM)
 *   [xid]     gpu, xid: one XID event, delivered once, in file order
 *
 * Memory follows NVML's documented semantics: nvmlDeviceGetMemoryInfo (v1) counts the
 * driver-reserved memory as used (used = total - free), nvmlDeviceGetMemoryInfo_v2 reports it
 * apart (total = reserved + used + free), as nvidia-smi does. Compiled with -DOLD_DRIVER the
 * library lacks the symbols newer drivers added (nvmlDeviceGetTemperatureV,
 * nvmlDeviceGetMemoryInfo_v2), so pynvml answers FUNCTION_NOT_FOUND as on an old driver.
 *
 * Built by tests/exporter/conftest.py at test set-up; nothing binary is committed.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

enum {
    OK = 0, E_UNINIT = 1, E_INVALID = 2, E_NOT_SUPPORTED = 3, E_NOT_FOUND = 6,
    E_INSUFFICIENT = 7, E_DRIVER = 9, E_TIMEOUT = 10, E_LOST = 15, E_MEMORY = 20,
    E_VERSION = 25, E_UNKNOWN = 999
};

#define MAXG 16
#define MAXM 7
#define MAXX 512
#define MAXP 8
#define GPU_MAGIC 0x6770750a
#define MIG_MAGIC 0x6d69670a

typedef struct gpu gpu_t;
typedef struct {
    int magic; gpu_t *parent; char uuid[96];
    unsigned gi, ci; unsigned long long mem_total, mem_used;
    double gpm_sm, gpm_occ, gpm_tensor, gpm_dram, gpm_gr;
} mig_t;

struct gpu {
    int magic; int index;
    char name[96], uuid[96], pci_bus_id[32], unsupported[1024], fail[512], hang[512];
    unsigned cc_major, cc_minor, util_gpu, util_mem, temp, mem_temp;
    unsigned long long mem_total, mem_reserved, mem_used, energy_mj, clock_events;
    unsigned power_mw, power_limit_mw, power_default_limit_mw;
    unsigned clock_sm, clock_mem, clock_graphics, fan, pstate, enc_util, dec_util;
    unsigned pcie_replay, pcie_gen, pcie_width, pcie_gen_max, pcie_width_max;
    unsigned long long viol[6];
    unsigned long long ecc_cv, ecc_ca, ecc_uv, ecc_ua;
    unsigned remap_corr, remap_unc, remap_pending, remap_failure;
    unsigned nvlink; unsigned long long nvlink_tx_kib, nvlink_rx_kib;
    unsigned gpm; double gpm_sm, gpm_occ, gpm_tensor, gpm_dram, gpm_gr, gpm_pcie_tx, gpm_pcie_rx;
    unsigned long long nvlink_crc_flit, nvlink_crc_data, nvlink_replay, nvlink_recovery;
    unsigned retired_sbe, retired_dbe, retired_pending;
    unsigned mig_mode, lost, nmig, nproc, lost_at_init;
    mig_t migs[MAXM];
    unsigned pids[MAXP]; unsigned long long pmem[MAXP];
};

typedef struct { unsigned gpu, xid; } xid_t;

typedef struct {
    char driver[80]; int cuda; unsigned init_error, epoch, hang_init, gpm_sample_limit;
    unsigned ngpus; gpu_t gpus[MAXG];
    unsigned nxid; xid_t xids[MAXX];
} state_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static state_t S, T; /* S is live; T is the parse buffer */
static struct timespec loaded_mtime; static ino_t loaded_ino; static off_t loaded_size;
static int loaded = 0, initialized = 0;
static unsigned session_epoch = 0, delivered = 0, live_gpm_samples = 0;

/* ---- scenario parsing ------------------------------------------------------------------ */
enum { T_STR, T_U32, T_U64, T_DBL };
typedef struct { const char *key; size_t off; int type; size_t size; } key_t_;
#define K(k, f, t) { k, offsetof(gpu_t, f), t, sizeof(((gpu_t *)0)->f) }
static const key_t_ GPU_KEYS[] = {
    K("name", name, T_STR), K("uuid", uuid, T_STR), K("pci_bus_id", pci_bus_id, T_STR),
    K("unsupported", unsupported, T_STR), K("fail", fail, T_STR), K("hang", hang, T_STR),
    K("cc_major", cc_major, T_U32), K("cc_minor", cc_minor, T_U32),
    K("util_gpu", util_gpu, T_U32), K("util_mem", util_mem, T_U32),
    K("temp", temp, T_U32), K("mem_temp", mem_temp, T_U32),
    K("mem_total", mem_total, T_U64), K("mem_reserved", mem_reserved, T_U64),
    K("mem_used", mem_used, T_U64), K("energy_mj", energy_mj, T_U64),
    K("clock_events", clock_events, T_U64),
    K("power_mw", power_mw, T_U32), K("power_limit_mw", power_limit_mw, T_U32),
    K("power_default_limit_mw", power_default_limit_mw, T_U32),
    K("clock_sm", clock_sm, T_U32), K("clock_mem", clock_mem, T_U32),
    K("clock_graphics", clock_graphics, T_U32), K("fan", fan, T_U32), K("pstate", pstate, T_U32),
    K("enc_util", enc_util, T_U32), K("dec_util", dec_util, T_U32),
    K("pcie_replay", pcie_replay, T_U32), K("pcie_gen", pcie_gen, T_U32),
    K("pcie_width", pcie_width, T_U32), K("pcie_gen_max", pcie_gen_max, T_U32),
    K("pcie_width_max", pcie_width_max, T_U32),
    K("viol_power_ns", viol[0], T_U64), K("viol_thermal_ns", viol[1], T_U64),
    K("viol_sync_boost_ns", viol[2], T_U64), K("viol_board_limit_ns", viol[3], T_U64),
    K("viol_low_utilization_ns", viol[4], T_U64), K("viol_reliability_ns", viol[5], T_U64),
    K("ecc_corrected_volatile", ecc_cv, T_U64), K("ecc_corrected_aggregate", ecc_ca, T_U64),
    K("ecc_uncorrected_volatile", ecc_uv, T_U64), K("ecc_uncorrected_aggregate", ecc_ua, T_U64),
    K("remap_correctable", remap_corr, T_U32), K("remap_uncorrectable", remap_unc, T_U32),
    K("remap_pending", remap_pending, T_U32), K("remap_failure", remap_failure, T_U32),
    K("nvlink", nvlink, T_U32), K("nvlink_tx_kib", nvlink_tx_kib, T_U64),
    K("nvlink_rx_kib", nvlink_rx_kib, T_U64),
    K("gpm", gpm, T_U32), K("gpm_sm_util", gpm_sm, T_DBL), K("gpm_sm_occupancy", gpm_occ, T_DBL),
    K("gpm_tensor", gpm_tensor, T_DBL), K("gpm_dram", gpm_dram, T_DBL),
    K("gpm_gr", gpm_gr, T_DBL), K("gpm_pcie_tx_mib", gpm_pcie_tx, T_DBL),
    K("gpm_pcie_rx_mib", gpm_pcie_rx, T_DBL),
    K("nvlink_crc_flit", nvlink_crc_flit, T_U64), K("nvlink_crc_data", nvlink_crc_data, T_U64),
    K("nvlink_replay", nvlink_replay, T_U64), K("nvlink_recovery", nvlink_recovery, T_U64),
    K("retired_sbe", retired_sbe, T_U32), K("retired_dbe", retired_dbe, T_U32),
    K("retired_pending", retired_pending, T_U32),
    K("mig_mode", mig_mode, T_U32), K("lost", lost, T_U32),
};

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

static void set_gpu_key(gpu_t *g, const char *k, const char *v) {
    if (!strcmp(k, "procs")) {
        char buf[512]; snprintf(buf, sizeof buf, "%s", v);
        for (char *tok = strtok(buf, ","); tok && g->nproc < MAXP; tok = strtok(NULL, ",")) {
            unsigned pid; unsigned long long mem;
            if (sscanf(tok, " %u:%llu", &pid, &mem) == 2) {
                g->pids[g->nproc] = pid; g->pmem[g->nproc++] = mem;
            }
        }
        return;
    }
    for (size_t i = 0; i < sizeof GPU_KEYS / sizeof *GPU_KEYS; i++) {
        const key_t_ *d = &GPU_KEYS[i];
        if (strcmp(d->key, k)) continue;
        char *p = (char *)g + d->off;
        switch (d->type) {
        case T_STR: snprintf(p, d->size, "%s", v); break;
        case T_U32: *(unsigned *)p = (unsigned)strtoul(v, NULL, 0); break;
        case T_U64: *(unsigned long long *)p = strtoull(v, NULL, 0); break;
        case T_DBL: *(double *)p = strtod(v, NULL); break;
        }
        return;
    }
    fprintf(stderr, "fake_nvml: unknown gpu key %s\n", k);
}

static void parse(FILE *f) {
    memset(&T, 0, sizeof T);
    char line[1200], section[16] = "";
    gpu_t *g = NULL; mig_t *m = NULL; xid_t *x = NULL;
    while (fgets(line, sizeof line, f)) {
        char *s = trim(line);
        if (!*s || *s == '#' || *s == ';') continue;
        if (*s == '[') {
            snprintf(section, sizeof section, "%.*s", (int)strcspn(s + 1, "]"), s + 1);
            if (!strcmp(section, "gpu") && T.ngpus < MAXG) {
                g = &T.gpus[T.ngpus]; g->index = T.ngpus++; m = NULL;
            } else if (!strcmp(section, "mig") && g && g->nmig < MAXM) {
                m = &g->migs[g->nmig++];
            } else if (!strcmp(section, "xid") && T.nxid < MAXX) {
                x = &T.xids[T.nxid++];
            }
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq) continue;
        *eq = 0;
        char *k = trim(s), *v = trim(eq + 1);
        if (!strcmp(section, "system")) {
            if (!strcmp(k, "driver")) snprintf(T.driver, sizeof T.driver, "%s", v);
            else if (!strcmp(k, "cuda")) T.cuda = atoi(v);
            else if (!strcmp(k, "init_error")) T.init_error = (unsigned)atoi(v);
            else if (!strcmp(k, "epoch")) T.epoch = (unsigned)atoi(v);
            else if (!strcmp(k, "hang_init")) T.hang_init = (unsigned)atoi(v);
            else if (!strcmp(k, "gpm_sample_limit")) T.gpm_sample_limit = (unsigned)atoi(v);
        } else if (!strcmp(section, "gpu") && g) {
            set_gpu_key(g, k, v);
        } else if (!strcmp(section, "mig") && m) {
            if (!strcmp(k, "uuid")) snprintf(m->uuid, sizeof m->uuid, "%s", v);
            else if (!strcmp(k, "gi")) m->gi = (unsigned)atoi(v);
            else if (!strcmp(k, "ci")) m->ci = (unsigned)atoi(v);
            else if (!strcmp(k, "mem_total")) m->mem_total = strtoull(v, NULL, 0);
            else if (!strcmp(k, "mem_used")) m->mem_used = strtoull(v, NULL, 0);
            else if (!strcmp(k, "gpm_sm_util")) m->gpm_sm = strtod(v, NULL);
            else if (!strcmp(k, "gpm_sm_occupancy")) m->gpm_occ = strtod(v, NULL);
            else if (!strcmp(k, "gpm_tensor")) m->gpm_tensor = strtod(v, NULL);
            else if (!strcmp(k, "gpm_dram")) m->gpm_dram = strtod(v, NULL);
            else if (!strcmp(k, "gpm_gr")) m->gpm_gr = strtod(v, NULL);
        } else if (!strcmp(section, "xid") && x) {
            if (!strcmp(k, "gpu")) x->gpu = (unsigned)atoi(v);
            else if (!strcmp(k, "xid")) x->xid = (unsigned)atoi(v);
        }
    }
}

/* Re-read the scenario when it changed. Handles point into S, so S is updated in place. */
static void reload_locked(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (loaded && st.st_mtim.tv_sec == loaded_mtime.tv_sec &&
        st.st_mtim.tv_nsec == loaded_mtime.tv_nsec && st.st_ino == loaded_ino &&
        st.st_size == loaded_size)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    parse(f);
    fclose(f);
    for (unsigned i = 0; i < MAXG; i++) {
        T.gpus[i].magic = GPU_MAGIC;
        T.gpus[i].lost_at_init = S.gpus[i].lost_at_init;
        for (unsigned j = 0; j < MAXM; j++) {
            T.gpus[i].migs[j].magic = MIG_MAGIC;
            T.gpus[i].migs[j].parent = &S.gpus[i];
        }
    }
    memcpy(&S, &T, sizeof S);
    loaded = 1; loaded_mtime = st.st_mtim; loaded_ino = st.st_ino; loaded_size = st.st_size;
}

static int has_token(const char *list, const char *tok) {
    size_t n = strlen(tok);
    for (const char *p = list; (p = strstr(p, tok)); p += n) {
        int start = p == list || p[-1] == ',' || p[-1] == ' ';
        int end = p[n] == 0 || p[n] == ',' || p[n] == ' ';
        if (start && end) return 1;
    }
    return 0;
}

static int session_ok(void) { return initialized && session_epoch == S.epoch; }

/* Lock, refresh, and validate a device (or MIG) handle; on OK the lock stays held. */
static int enter(void *h, const char *fn, gpu_t **gp, mig_t **mp) {
    pthread_mutex_lock(&mu);
    reload_locked();
    /* A hung call blocks this caller only: other threads (other GPUs) go on. */
    while (h && (*(int *)h == GPU_MAGIC || *(int *)h == MIG_MAGIC)) {
        gpu_t *hg = *(int *)h == GPU_MAGIC ? (gpu_t *)h : ((mig_t *)h)->parent;
        if (!has_token(hg->hang, fn) && !has_token(hg->hang, "*")) break;
        pthread_mutex_unlock(&mu);
        usleep(20000);
        pthread_mutex_lock(&mu);
        reload_locked();
    }
    int rc = OK;
    gpu_t *g = NULL; mig_t *m = NULL;
    if (!session_ok()) rc = E_UNINIT;
    else if (!h) rc = E_INVALID;
    else if (*(int *)h == GPU_MAGIC) g = h;
    else if (*(int *)h == MIG_MAGIC && mp) { m = h; g = m->parent; }
    else rc = E_INVALID;
    if (rc == OK && (unsigned)g->index >= S.ngpus) rc = E_INVALID;
    else if (rc == OK && (g->lost || g->lost_at_init)) rc = E_LOST;
    else if (rc == OK && has_token(g->unsupported, fn)) rc = E_NOT_SUPPORTED;
    else if (rc == OK && has_token(g->fail, fn)) rc = E_UNKNOWN;
    if (rc != OK) { pthread_mutex_unlock(&mu); return rc; }
    *gp = g;
    if (mp) *mp = m;
    return OK;
}
#define DEV(h) gpu_t *g; { int _rc = enter((h), __func__, &g, NULL); if (_rc) return _rc; }
#define ANY(h) gpu_t *g; mig_t *m; { int _rc = enter((h), __func__, &g, &m); if (_rc) return _rc; }
#define RET(rc) do { pthread_mutex_unlock(&mu); return (rc); } while (0)

/* ---- session and system ------------------------------------------------------------------ */
EXPORT const char *nvmlErrorString(int rc) {
    switch (rc) {
    case OK: return "Success";
    case E_UNINIT: return "Uninitialized";
    case E_INVALID: return "Invalid Argument";
    case E_NOT_SUPPORTED: return "Not Supported";
    case E_NOT_FOUND: return "Not Found";
    case E_INSUFFICIENT: return "Insufficient Size";
    case E_DRIVER: return "Driver Not Loaded";
    case E_TIMEOUT: return "Timeout";
    case E_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

EXPORT int nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    reload_locked();
    if (!loaded) RET(E_DRIVER);
    while (S.hang_init) {
        pthread_mutex_unlock(&mu);
        usleep(20000);
        pthread_mutex_lock(&mu);
        reload_locked();
    }
    if (S.init_error) RET((int)S.init_error);
    initialized = 1;
    session_epoch = S.epoch;
    for (unsigned i = 0; i < MAXG; i++) S.gpus[i].lost_at_init = i < S.ngpus && S.gpus[i].lost;
    RET(OK);
}
EXPORT int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT int nvmlShutdown(void) {
    pthread_mutex_lock(&mu);
    initialized = 0;
    RET(OK);
}

static int sys_enter(void) {
    pthread_mutex_lock(&mu);
    reload_locked();
    if (!session_ok()) { pthread_mutex_unlock(&mu); return E_UNINIT; }
    return OK;
}
#define SYS() { int _rc = sys_enter(); if (_rc) return _rc; }

EXPORT int nvmlSystemGetDriverVersion(char *buf, unsigned len) {
    SYS(); snprintf(buf, len, "%s", S.driver); RET(OK);
}
EXPORT int nvmlSystemGetNVMLVersion(char *buf, unsigned len) {
    SYS(); snprintf(buf, len, "12.%s", S.driver); RET(OK);
}
EXPORT int nvmlSystemGetCudaDriverVersion(int *v) { SYS(); *v = S.cuda; RET(OK); }
EXPORT int nvmlSystemGetCudaDriverVersion_v2(int *v) { SYS(); *v = S.cuda; RET(OK); }
EXPORT int nvmlDeviceGetCount_v2(unsigned *n) { SYS(); *n = S.ngpus; RET(OK); }
EXPORT int nvmlDeviceGetHandleByIndex_v2(unsigned i, gpu_t **out) {
    SYS();
    if (i >= S.ngpus) RET(E_INVALID);
    if (S.gpus[i].lost || S.gpus[i].lost_at_init) RET(E_LOST);
    *out = &S.gpus[i];
    RET(OK);
}

/* ---- identity ---------------------------------------------------------------------------- */
EXPORT int nvmlDeviceGetName(void *h, char *buf, unsigned len) {
    DEV(h); snprintf(buf, len, "%s", g->name); RET(OK);
}
EXPORT int nvmlDeviceGetUUID(void *h, char *buf, unsigned len) {
    ANY(h); snprintf(buf, len, "%s", m ? m->uuid : g->uuid); RET(OK);
}
EXPORT int nvmlDeviceGetIndex(void *h, unsigned *i) { DEV(h); *i = (unsigned)g->index; RET(OK); }

typedef struct {
    char busIdLegacy[16]; unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} pci_t;
EXPORT int nvmlDeviceGetPciInfo_v3(void *h, pci_t *p) {
    DEV(h);
    memset(p, 0, sizeof *p);
    snprintf(p->busId, sizeof p->busId, "%s", g->pci_bus_id);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%.15s", g->pci_bus_id);
    sscanf(g->pci_bus_id, "%x:%x:%x", &p->domain, &p->bus, &p->device);
    p->pciDeviceId = 0x233010de;
    RET(OK);
}
EXPORT int nvmlDeviceGetCudaComputeCapability(void *h, int *major, int *minor) {
    DEV(h); *major = (int)g->cc_major; *minor = (int)g->cc_minor; RET(OK);
}
EXPORT int nvmlDeviceGetMigMode(void *h, unsigned *cur, unsigned *pending) {
    DEV(h); *cur = g->mig_mode; *pending = g->mig_mode; RET(OK);
}

/* ---- readings ---------------------------------------------------------------------------- */
EXPORT int nvmlDeviceGetUtilizationRates(void *h, unsigned u[2]) {
    DEV(h); u[0] = g->util_gpu; u[1] = g->util_mem; RET(OK);
}
static unsigned long long mem_free(gpu_t *g) {
    unsigned long long taken = g->mem_used + g->mem_reserved;
    return g->mem_total > taken ? g->mem_total - taken : 0;
}
EXPORT int nvmlDeviceGetMemoryInfo(void *h, unsigned long long v[3]) {
    ANY(h);
    if (m) { v[0] = m->mem_total; v[1] = m->mem_total - m->mem_used; v[2] = m->mem_used; }
    else { v[0] = g->mem_total; v[1] = mem_free(g); v[2] = g->mem_total - mem_free(g); }
    RET(OK);
}
#ifndef OLD_DRIVER
typedef struct {
    unsigned version; unsigned long long total, reserved, free, used;
} mem2_t;
EXPORT int nvmlDeviceGetMemoryInfo_v2(void *h, mem2_t *v) {
    DEV(h);
    if (v->version != 0x02000028) RET(E_VERSION);
    v->total = g->mem_total; v->reserved = g->mem_reserved;
    v->free = mem_free(g); v->used = g->mem_used;
    RET(OK);
}
typedef struct { unsigned version; int sensorType; int temperature; } temp_v1_t;
EXPORT int nvmlDeviceGetTemperatureV(void *h, temp_v1_t *t) {
    DEV(h);
    if (t->version != 0x100000C) RET(E_VERSION);
    if (t->sensorType != 0) RET(E_INVALID);
    t->temperature = (int)g->temp;
    RET(OK);
}
#endif
EXPORT int nvmlDeviceGetTemperature(void *h, unsigned sensor, unsigned *t) {
    DEV(h);
    if (sensor != 0) RET(E_INVALID);
    *t = g->temp;
    RET(OK);
}
#define UINT_GETTER(fn, field) \
    EXPORT int fn(void *h, unsigned *out) { DEV(h); *out = g->field; RET(OK); }
UINT_GETTER(nvmlDeviceGetPowerUsage, power_mw)
UINT_GETTER(nvmlDeviceGetEnforcedPowerLimit, power_limit_mw)
UINT_GETTER(nvmlDeviceGetPowerManagementLimit, power_limit_mw)
UINT_GETTER(nvmlDeviceGetPowerManagementDefaultLimit, power_default_limit_mw)
UINT_GETTER(nvmlDeviceGetFanSpeed, fan)
UINT_GETTER(nvmlDeviceGetPerformanceState, pstate)
UINT_GETTER(nvmlDeviceGetPcieReplayCounter, pcie_replay)
UINT_GETTER(nvmlDeviceGetCurrPcieLinkGeneration, pcie_gen)
UINT_GETTER(nvmlDeviceGetCurrPcieLinkWidth, pcie_width)
UINT_GETTER(nvmlDeviceGetMaxPcieLinkGeneration, pcie_gen_max)
UINT_GETTER(nvmlDeviceGetMaxPcieLinkWidth, pcie_width_max)

EXPORT int nvmlDeviceGetTotalEnergyConsumption(void *h, unsigned long long *mj) {
    DEV(h); *mj = g->energy_mj; RET(OK);
}
EXPORT int nvmlDeviceGetClockInfo(void *h, unsigned type, unsigned *mhz) {
    DEV(h);
    switch (type) {
    case 0: *mhz = g->clock_graphics; break;
    case 1: *mhz = g->clock_sm; break;
    case 2: *mhz = g->clock_mem; break;
    default: RET(E_INVALID);
    }
    RET(OK);
}
EXPORT int nvmlDeviceGetEncoderUtilization(void *h, unsigned *u, unsigned *period) {
    DEV(h); *u = g->enc_util; *period = 167000; RET(OK);
}
EXPORT int nvmlDeviceGetDecoderUtilization(void *h, unsigned *u, unsigned *period) {
    DEV(h); *u = g->dec_util; *period = 167000; RET(OK);
}
EXPORT int nvmlDeviceGetCurrentClocksEventReasons(void *h, unsigned long long *mask) {
    DEV(h); *mask = g->clock_events; RET(OK);
}
EXPORT int nvmlDeviceGetViolationStatus(void *h, unsigned policy, unsigned long long v[2]) {
    DEV(h);
    if (policy > 5) RET(E_NOT_SUPPORTED);
    v[0] = (unsigned long long)time(NULL) * 1000000000ULL;
    v[1] = g->viol[policy];
    RET(OK);
}
EXPORT int nvmlDeviceGetTotalEccErrors(void *h, unsigned type, unsigned counter,
                                       unsigned long long *n) {
    DEV(h);
    if (type > 1 || counter > 1) RET(E_INVALID);
    *n = type == 0 ? (counter == 0 ? g->ecc_cv : g->ecc_ca) : (counter == 0 ? g->ecc_uv : g->ecc_ua);
    RET(OK);
}
EXPORT int nvmlDeviceGetRemappedRows(void *h, unsigned *corr, unsigned *unc, unsigned *pending,
                                     unsigned *failure) {
    DEV(h);
    *corr = g->remap_corr; *unc = g->remap_unc;
    *pending = g->remap_pending; *failure = g->remap_failure;
    RET(OK);
}

typedef struct {
    unsigned fieldId, scopeId; long long timestamp, latencyUsec; unsigned valueType, nvmlReturn;
    union { double d; unsigned ui; unsigned long ul; unsigned long long ull; long long sll; } value;
} field_t;
EXPORT int nvmlDeviceGetFieldValues(void *h, int count, field_t *fv) {
    DEV(h);
    for (int i = 0; i < count; i++) {
        char tok[32];
        snprintf(tok, sizeof tok, "field:%u", fv[i].fieldId);
        fv[i].timestamp = (long long)time(NULL) * 1000000;
        fv[i].latencyUsec = 0;
        fv[i].nvmlReturn = OK;
        if (has_token(g->unsupported, tok)) { fv[i].nvmlReturn = E_NOT_SUPPORTED; continue; }
        switch (fv[i].fieldId) {
        case 82: fv[i].valueType = 1; fv[i].value.ui = g->mem_temp; break;
        case 138: case 139:
            if (!g->nvlink) { fv[i].nvmlReturn = E_NOT_SUPPORTED; break; }
            fv[i].valueType = 3;
            fv[i].value.ull = fv[i].fieldId == 138 ? g->nvlink_tx_kib : g->nvlink_rx_kib;
            break;
        case 38: case 45: case 52: case 59:
            if (!g->nvlink) { fv[i].nvmlReturn = E_NOT_SUPPORTED; break; }
            fv[i].valueType = 3;
            fv[i].value.ull = fv[i].fieldId == 38 ? g->nvlink_crc_flit
                : fv[i].fieldId == 45 ? g->nvlink_crc_data
                : fv[i].fieldId == 52 ? g->nvlink_replay : g->nvlink_recovery;
            break;
        default: fv[i].nvmlReturn = E_NOT_SUPPORTED;
        }
    }
    RET(OK);
}

/* Retired pages (pre-Ampere; later GPUs remap rows and answer NOT_SUPPORTED). */
EXPORT int nvmlDeviceGetRetiredPages(void *h, unsigned cause, unsigned *count,
                                     unsigned long long *addresses) {
    DEV(h);
    if (cause > 1) RET(E_INVALID);
    unsigned n = cause == 0 ? g->retired_sbe : g->retired_dbe;
    if (!addresses || *count < n) { *count = n; RET(n ? E_INSUFFICIENT : OK); }
    for (unsigned i = 0; i < n; i++) addresses[i] = 0x1000ULL * (i + 1);
    *count = n;
    RET(OK);
}
EXPORT int nvmlDeviceGetRetiredPagesPendingStatus(void *h, unsigned *pending) {
    DEV(h); *pending = g->retired_pending; RET(OK);
}

typedef struct { unsigned pid; unsigned long long mem; unsigned gi, ci; } proc_t;
EXPORT int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned *count, proc_t *out) {
    DEV(h);
    if (g->nproc == 0) { *count = 0; RET(OK); }
    if (!out || *count < g->nproc) { *count = g->nproc; RET(E_INSUFFICIENT); }
    for (unsigned i = 0; i < g->nproc; i++) {
        out[i].pid = g->pids[i]; out[i].mem = g->pmem[i];
        out[i].gi = 0xFFFFFFFF; out[i].ci = 0xFFFFFFFF;
    }
    *count = g->nproc;
    RET(OK);
}

/* ---- MIG --------------------------------------------------------------------------------- */
EXPORT int nvmlDeviceGetMaxMigDeviceCount(void *h, unsigned *n) {
    DEV(h); *n = g->mig_mode ? MAXM : 0; RET(OK);
}
EXPORT int nvmlDeviceGetMigDeviceHandleByIndex(void *h, unsigned i, mig_t **out) {
    DEV(h);
    if (!g->mig_mode) RET(E_INVALID);
    if (i >= g->nmig) RET(E_NOT_FOUND);
    *out = &g->migs[i];
    RET(OK);
}
EXPORT int nvmlDeviceGetGpuInstanceId(void *h, unsigned *id) {
    ANY(h); if (!m) RET(E_INVALID); *id = m->gi; RET(OK);
}
EXPORT int nvmlDeviceGetComputeInstanceId(void *h, unsigned *id) {
    ANY(h); if (!m) RET(E_INVALID); *id = m->ci; RET(OK);
}

/* ---- GPM --------------------------------------------------------------------------------- */
typedef struct { unsigned version, isSupportedDevice; } gpm_support_t;
typedef struct { gpu_t *g; mig_t *m; struct timespec taken; } gpm_sample_t;
typedef struct { const char *shortName, *longName, *unit; } gpm_info_t;
typedef struct { unsigned metricId; unsigned nvmlReturn; double value; gpm_info_t info; } gpm_metric_t;
typedef struct {
    unsigned version, numMetrics; gpm_sample_t *s1, *s2; gpm_metric_t metrics[];
} gpm_get_t;

EXPORT int nvmlGpmQueryDeviceSupport(void *h, gpm_support_t *s) {
    DEV(h); s->isSupportedDevice = g->gpm; RET(OK);
}
/* Samples are a driver resource: a caller that never frees them runs into the limit. */
EXPORT int nvmlGpmSampleAlloc(gpm_sample_t **out) {
    pthread_mutex_lock(&mu);
    reload_locked();
    if (S.gpm_sample_limit && live_gpm_samples >= S.gpm_sample_limit) RET(E_MEMORY);
    *out = calloc(1, sizeof **out);
    if (!*out) RET(E_MEMORY);
    live_gpm_samples++;
    RET(OK);
}
EXPORT int nvmlGpmSampleFree(gpm_sample_t *s) {
    pthread_mutex_lock(&mu);
    if (!s) RET(E_INVALID);
    free(s);
    live_gpm_samples--;
    RET(OK);
}
EXPORT int nvmlGpmSampleGet(void *h, gpm_sample_t *s) {
    DEV(h);
    if (!g->gpm) RET(E_NOT_SUPPORTED);
    s->g = g; s->m = NULL;
    clock_gettime(CLOCK_MONOTONIC, &s->taken);
    RET(OK);
}
EXPORT int nvmlGpmMigSampleGet(void *h, unsigned gi, gpm_sample_t *s) {
    DEV(h);
    if (!g->gpm) RET(E_NOT_SUPPORTED);
    if (!g->mig_mode) RET(E_INVALID);
    for (unsigned i = 0; i < g->nmig; i++) {
        if (g->migs[i].gi != gi) continue;
        s->g = g; s->m = &g->migs[i];
        clock_gettime(CLOCK_MONOTONIC, &s->taken);
        RET(OK);
    }
    RET(E_NOT_FOUND);
}
/* NVML needs at least 100 ms between the two samples of a metric; closer samples are refused. */
EXPORT int nvmlGpmMetricsGet(gpm_get_t *req) {
    SYS();
    if (!req->s1 || !req->s2 || !req->s2->g || req->s1->g != req->s2->g ||
        req->s1->m != req->s2->m)
        RET(E_INVALID);
    long ms = (req->s2->taken.tv_sec - req->s1->taken.tv_sec) * 1000 +
              (req->s2->taken.tv_nsec - req->s1->taken.tv_nsec) / 1000000;
    if (ms < 100) RET(E_INVALID);
    gpu_t *g = req->s2->g;
    mig_t *m = req->s2->m;
    for (unsigned i = 0; i < req->numMetrics; i++) {
        gpm_metric_t *mt = &req->metrics[i];
        mt->nvmlReturn = OK;
        switch (mt->metricId) {
        case 1: mt->value = m ? m->gpm_gr : g->gpm_gr; break;
        case 2: mt->value = m ? m->gpm_sm : g->gpm_sm; break;
        case 3: mt->value = m ? m->gpm_occ : g->gpm_occ; break;
        case 5: mt->value = m ? m->gpm_tensor : g->gpm_tensor; break;
        case 10: mt->value = m ? m->gpm_dram : g->gpm_dram; break;
        case 20: if (m) mt->nvmlReturn = E_NOT_SUPPORTED; else mt->value = g->gpm_pcie_tx; break;
        case 21: if (m) mt->nvmlReturn = E_NOT_SUPPORTED; else mt->value = g->gpm_pcie_rx; break;
        default: mt->nvmlReturn = E_NOT_SUPPORTED;
        }
    }
    RET(OK);
}

/* ---- events ------------------------------------------------------------------------------ */
typedef struct { void *device; unsigned long long type, data; unsigned gi, ci; } event_t;
typedef struct { int registered[MAXG]; } eventset_t;

EXPORT int nvmlEventSetCreate(eventset_t **out) {
    SYS();
    *out = calloc(1, sizeof **out);
    RET(*out ? OK : E_UNKNOWN);
}
EXPORT int nvmlEventSetFree(eventset_t *set) { free(set); return OK; }
EXPORT int nvmlDeviceGetSupportedEventTypes(void *h, unsigned long long *types) {
    DEV(h); *types = 0x8ULL | 0x1ULL | 0x2ULL; RET(OK);
}
EXPORT int nvmlDeviceRegisterEvents(void *h, unsigned long long types, eventset_t *set) {
    DEV(h);
    if (types & 0x8ULL) set->registered[g->index] = 1;
    RET(OK);
}
EXPORT int nvmlEventSetWait_v2(eventset_t *set, event_t *out, unsigned timeout_ms) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        { int rc = sys_enter(); if (rc) return rc; }
        while (delivered < S.nxid) {
            xid_t x = S.xids[delivered++];
            if (x.gpu < S.ngpus && set->registered[x.gpu]) {
                memset(out, 0, sizeof *out);
                out->device = &S.gpus[x.gpu];
                out->type = 0x8ULL;
                out->data = x.xid;
                out->gi = out->ci = 0xFFFFFFFF;
                RET(OK);
            }
        }
        pthread_mutex_unlock(&mu);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed >= (long)timeout_ms) return E_TIMEOUT;
        usleep(20000);
    }
}
