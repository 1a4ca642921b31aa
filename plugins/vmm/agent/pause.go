package agent

import (
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
)

// PauseArg is the argument that runs the agent's binary as the init of a
// pod's shared PID namespace (see Pause).
const PauseArg = "pause"

// Pause is the init of a pod's shared PID namespace: the agent starts its
// own binary with PauseArg in a new PID namespace, and containers of a pod
// that shares its PID namespace join it. It holds the namespace (a PID
// namespace whose init is gone takes no new process), reaps the orphans
// of the pod's processes and ignores every signal it can: from inside its
// namespace only the signals an init handles reach it. It never returns.
func Pause() {
	signal.Ignore(unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2,
		unix.SIGPIPE, unix.SIGALRM, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU, unix.SIGWINCH)
	chld := make(chan os.Signal, 16)
	signal.Notify(chld, unix.SIGCHLD)
	for {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if pid <= 0 || err != nil {
				break
			}
		}
		<-chld
	}
}
