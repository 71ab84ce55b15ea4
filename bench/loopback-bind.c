// LD_PRELOAD shim for bench/run.sh: turns bind(0.0.0.0:p) into bind(127.0.0.1:p), so a peer
// server that hard-codes INADDR_ANY (Hyper-DERP has no listen-address option) listens only on
// loopback. It also sets SO_REUSEADDR there, as servers usually do, so that a restart between
// rounds binds while the last round's connections are in TIME-WAIT. Built by bench/run.sh with
// cc -shared -fPIC.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *a, socklen_t l) {
  static int (*real)(int, const struct sockaddr *, socklen_t);
  if (!real) real = dlsym(RTLD_NEXT, "bind");
  if (a && a->sa_family == AF_INET && l >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in s;
    memcpy(&s, a, sizeof s);
    if (s.sin_addr.s_addr == htonl(INADDR_ANY)) {
      s.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      int one = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      return real(fd, (const struct sockaddr *)&s, sizeof s);
    }
  }
  return real(fd, a, l);
}
