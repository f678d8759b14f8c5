/* LD_PRELOAD shim for the COLO benchmark (scripts/bench_colo.py): sets TCP_NODELAY on every TCP
 * socket that connect(), accept() or accept4() returns, so QEMU 7.2's migration/COLO stream (which
 * leaves Nagle on) does not wait ~40 ms for a delayed ACK behind each small COLO message.
 * Build: gcc -shared -fPIC -O2 -o nodelay_shim.so nodelay_shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

static void nodelay(int fd)
{
    /* One line per TCP socket on stderr, so the benchmark can check that the shim was active. */
    static const char msg[] = "nodelay_shim: TCP_NODELAY set\n";
    int saved = errno, type = 0, domain = 0, one = 1;
    socklen_t tlen = sizeof(type), dlen = sizeof(domain);
    if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM ||
        getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &dlen) != 0 ||
        (domain != AF_INET && domain != AF_INET6)) {
        errno = saved;
        return;
    }
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0) {
        ssize_t ignored = write(2, msg, sizeof(msg) - 1);
        (void)ignored;
    }
    errno = saved;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    /* Set before connecting: QEMU connects non-blocking (EINPROGRESS), the option sticks. */
    nodelay(fd);
    return real(fd, addr, len);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int r = real(fd, addr, len);
    nodelay(r);
    return r;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int r = real(fd, addr, len, flags);
    nodelay(r);
    return r;
}
