/*
 * pause: PID 1 of a pod sandbox, built here so the local node needs no registry (hack/image.sh).
 *
 * It holds the pod's namespaces open, reaps the zombies the other containers' orphans leave behind
 * (the sandbox is their init when the pod shares its PID namespace), and exits 0 on SIGINT/SIGTERM so
 * a pod stops at once instead of waiting for SIGKILL: a PID 1 without handlers ignores those signals.
 * The same three duties as Kubernetes' build/pause/linux/pause.c, written from scratch.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
  (void)signal_number;
  _exit(0);
}

static void reap(int signal_number) {
  (void)signal_number;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction on_stop = {.sa_handler = stop};
  struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
  if (sigaction(SIGINT, &on_stop, NULL) != 0 || sigaction(SIGTERM, &on_stop, NULL) != 0 ||
      sigaction(SIGCHLD, &on_child, NULL) != 0) {
    return 1;
  }
  for (;;) {
    pause();
  }
}
