/* The CUDA driver API through libcuda.so.1 as a container's loader finds it (the claim's
 * CDI mounts): cuInit, the devices it sees, the first one's name and UUID, and 1 MiB
 * allocated and freed in its primary context. One line per fact on stdout; on a failure
 * the call and CUDA's error on stderr, exit status 1 (2: libcuda.so.1 did not load). */
#include <dlfcn.h>
#include <stdio.h>

typedef int (*init_t)(unsigned);
typedef int (*count_t)(int *);
typedef int (*get_t)(int *, int);
typedef int (*name_t)(char *, int, int);
typedef int (*uuid_t_)(unsigned char *, int);
typedef int (*retain_t)(void **, int);
typedef int (*set_t)(void *);
typedef int (*alloc_t)(unsigned long long *, size_t);
typedef int (*free_t)(unsigned long long);
typedef int (*release_t)(int);
typedef int (*errstr_t)(int, const char **);

static void *lib;

static void *sym(const char *name) {
    void *found = dlsym(lib, name);
    if (found == NULL) {
        fprintf(stderr, "dlsym %s: %s\n", name, dlerror());
    }
    return found;
}

static int check(const char *call, int status) {
    if (status != 0) {
        const char *text = "?";
        errstr_t errstr = (errstr_t)sym("cuGetErrorString");
        if (errstr != NULL) {
            errstr(status, &text);
        }
        fprintf(stderr, "%s: error %d (%s)\n", call, status, text);
    }
    return status;
}

int main(void) {
    lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == NULL) {
        fprintf(stderr, "dlopen libcuda.so.1: %s\n", dlerror());
        return 2;
    }
    init_t init = (init_t)sym("cuInit");
    count_t count = (count_t)sym("cuDeviceGetCount");
    get_t get = (get_t)sym("cuDeviceGet");
    name_t name = (name_t)sym("cuDeviceGetName");
    uuid_t_ uuid = (uuid_t_)sym("cuDeviceGetUuid");
    retain_t retain = (retain_t)sym("cuDevicePrimaryCtxRetain");
    set_t set = (set_t)sym("cuCtxSetCurrent");
    alloc_t alloc = (alloc_t)sym("cuMemAlloc_v2");
    free_t release_mem = (free_t)sym("cuMemFree_v2");
    release_t release = (release_t)sym("cuDevicePrimaryCtxRelease_v2");
    if (!init || !count || !get || !name || !uuid || !retain || !set || !alloc ||
        !release_mem || !release) {
        return 1;
    }
    int devices = 0, device = 0;
    char text[256];
    unsigned char id[16];
    void *context = NULL;
    unsigned long long pointer = 0;
    if (check("cuInit", init(0)) || check("cuDeviceGetCount", count(&devices))) {
        return 1;
    }
    printf("devices %d\n", devices);
    if (check("cuDeviceGet", get(&device, 0)) ||
        check("cuDeviceGetName", name(text, sizeof text, device)) ||
        check("cuDeviceGetUuid", uuid(id, device))) {
        return 1;
    }
    printf("name %s\n", text);
    printf("uuid GPU-");
    for (int i = 0; i < 16; i++) {
        printf("%02x%s", id[i], (i == 3 || i == 5 || i == 7 || i == 9) ? "-" : "");
    }
    printf("\n");
    if (check("cuDevicePrimaryCtxRetain", retain(&context, device)) ||
        check("cuCtxSetCurrent", set(context)) ||
        check("cuMemAlloc", alloc(&pointer, 1 << 20)) ||
        check("cuMemFree", release_mem(pointer)) ||
        check("cuDevicePrimaryCtxRelease", release(device))) {
        return 1;
    }
    printf("memory 1 MiB allocated and freed\n");
    return 0;
}
