// Command kuasar-wasm-host is the node-wide WebAssembly host of
// containerd-kuasar (see package plugins/wasmhost). containerd-kuasar starts
// it on demand for the kuasar-wasm sandbox; it runs every Wasm container of
// the node as a module instance on a thread of its own, outlives daemon
// restarts, and exits by itself once it has had no container for a while.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/cmd/internal/version"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// The main goroutine keeps the main thread to itself: container threads
// change their namespaces and end with their goroutines, which the main
// thread cannot.
func init() { runtime.LockOSThread() }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kuasar-wasm-host:", err)
		os.Exit(1)
	}
}

func run() error {
	socket := flag.String("socket", "", "socket to serve on (required)")
	cacheDir := flag.String("cache-dir", "", "directory of compiled code kept across restarts (empty: none)")
	keep := flag.Int("keep-modules", 16, "compiled modules kept in memory when no container uses them")
	idle := flag.Duration("idle", time.Minute, "exit after having no container this long (0: never)")
	level := flag.String("log-level", "info", "log level")
	oomScoreAdj := flag.Int("oom-score-adj", 0, "the host's oom_score_adj (-1000 to 1000), instead of the daemon's it would inherit")
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
	// Not the daemon's score (a node's containerd runs at -999, which would
	// make the kernel kill Wasm workloads of every pod last, after the
	// node's own services).
	if err := wasmhost.SetOOMScoreAdj(*oomScoreAdj); err != nil {
		return err
	}
	// SIGTERM and SIGINT stop the host and every module in it; the daemon
	// never sends them (the host outlives it), an operator may.
	ctx, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer cancel()
	// Writes to a pipe whose reader is gone fail; they do not kill the host.
	signal.Ignore(unix.SIGPIPE)
	// Every module of the node shares this process's descriptor table.
	var nofile unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile); err == nil && nofile.Cur < nofile.Max {
		nofile.Cur = nofile.Max
		_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &nofile)
	}

	// One host per socket.
	l, err := wasmhost.Listen(*socket)
	if err != nil {
		return err
	}
	defer l.Close()
	h, err := wasmhost.NewHost(ctx, wasmhost.Options{CacheDir: *cacheDir, KeepModules: *keep, Idle: *idle})
	if err != nil {
		return err
	}
	defer h.Close(context.Background())
	log.G(ctx).WithField("pid", os.Getpid()).WithField("socket", *socket).Info("kuasar-wasm-host serving")
	return h.Serve(ctx, l)
}
