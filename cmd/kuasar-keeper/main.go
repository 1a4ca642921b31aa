// Command kuasar-keeper is the node-wide process keeper of containerd-kuasar
// (see package pkg/keeper). containerd-kuasar starts it on demand; it is the
// parent of workload processes so that their exit statuses, terminals and
// stdin survive a daemon restart, and it exits by itself once idle.
//
// Run as "kuasar-keeper pause" it is instead the init of a pod's shared PID
// namespace: it reaps orphans and waits for a signal. Run as
// "kuasar-keeper jail SPEC -- COMMAND..." it confines itself (package
// plugins/vmm/jail) and execs COMMAND: how kuasar-vmm starts a hypervisor.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"time"
	"unsafe"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/cmd/internal/version"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/jail"
)

func main() {
	// The sandboxes start it with argv[0] "pause", so that it reads as the
	// pod's pause process in ps.
	if filepath.Base(os.Args[0]) == "pause" || (len(os.Args) > 1 && os.Args[1] == "pause") {
		os.Exit(pause())
	}
	// kuasar-vmm spawns each hypervisor through it: it jails itself and
	// execs the hypervisor.
	if len(os.Args) > 1 && os.Args[1] == jail.Arg {
		os.Exit(jail.Main(os.Args[2:]))
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kuasar-keeper:", err)
		os.Exit(1)
	}
}

func run() error {
	socket := flag.String("socket", "", "socket to serve on (required)")
	idle := flag.Duration("idle", time.Minute, "exit after being idle this long (0: never)")
	level := flag.String("log-level", "info", "log level")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		version.Fprint(os.Stdout)
		return nil
	}
	if *socket == "" {
		return errors.New("--socket is required")
	}
	if err := log.SetLevel(*level); err != nil {
		return err
	}
	// The keeper's live data is tiny (pids, a few descriptors); keep its
	// heap close to it, unless GOGC says otherwise.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(20)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer cancel()

	// One keeper per socket.
	l, err := keeper.Listen(*socket)
	if err != nil {
		return err
	}
	defer l.Close()
	log.G(ctx).WithField("pid", os.Getpid()).WithField("socket", *socket).Info("kuasar-keeper serving")
	s := keeper.NewServer(*idle)
	defer s.Shutdown()
	return s.Serve(ctx, l.UnixListener)
}

// pause is the init of a shared PID namespace: it reaps every orphan and
// exits on SIGTERM or SIGINT.
func pause() int {
	// Read as "pause" in ps, like the pause container it replaces.
	_ = unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&[]byte("pause\x00")[0])), 0, 0, 0)
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT)
	for s := range sigs {
		if s != unix.SIGCHLD {
			return 0
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
	return 0
}
