package appkernel

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/appkernel/sentry"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// An exec is started through the sandbox's control socket, not by a runsc
// process (`runsc exec` stays to wait for its process): the daemon opens
// CRI's FIFOs, or a terminal, and hands the descriptors to the sandbox,
// which keeps them for the process. Without a terminal the process writes
// straight into the FIFOs; with one the daemon copies between the
// terminal's master and the FIFOs. containerd forgets execs across a
// restart, and an exec's streams go with the daemon too (the process runs
// on in the sandbox).

// outputDrain bounds the wait for a terminal's output to be copied out
// after its process exited.
const outputDrain = 2 * time.Second

// execIO is what the daemon holds of an exec's streams.
type execIO struct {
	mu sync.Mutex
	// fds are the descriptors 0, 1 and 2 of the process; owned are the
	// daemon's files among them, closed once the sandbox holds them.
	fds   [3]*os.File
	owned []*os.File
	// stdinKeep keeps stdin from seeing EOF until CloseIO.
	stdinKeep *os.File
	// A terminal: its master, the stdin FIFO copied into it, and done once
	// its output is copied out.
	console  console.Console
	stdinSrc io.Closer
	outDone  chan struct{}
}

// openExecIO opens an exec's streams.
func openExecIO(ctx context.Context, sio task.IO) (_ *execIO, retErr error) {
	e := &execIO{}
	defer func() {
		if retErr != nil {
			e.close()
		}
	}()
	if sio.Terminal {
		return e, e.openTerminal(sio)
	}
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	e.owned = append(e.owned, null)
	e.fds = [3]*os.File{null, null, null}
	if sio.Stdin != "" {
		r, w, err := keeper.OpenStdin(sio.Stdin)
		if err != nil {
			return nil, err
		}
		e.owned = append(e.owned, r)
		e.fds[0], e.stdinKeep = r, w
	}
	for i, path := range []string{sio.Stdout, sio.Stderr} {
		if i == 1 && path == sio.Stdout {
			e.fds[2] = e.fds[1]
			break
		}
		f, err := openExecOutput(ctx, path)
		if err != nil {
			return nil, err
		}
		if f != nil {
			e.owned = append(e.owned, f)
			e.fds[1+i] = f
		}
	}
	return e, nil
}

// readerWait bounds the wait for the reader of an exec's output FIFO.
const readerWait = 10 * time.Second

// openExecOutput opens where an exec's output goes. A FIFO is opened for
// writing once its reader (CRI, which opens it as it starts copying) has
// opened it: the sandbox may run the process and close the FIFO within a
// millisecond, and a reader that opens a FIFO after its last writer has
// gone waits for a writer forever. With no reader in time, it is opened
// read-write (it never blocks then).
func openExecOutput(ctx context.Context, path string) (*os.File, error) {
	if st, err := os.Stat(path); path == "" || err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		return keeper.OpenOutput(path)
	}
	type opened struct {
		f   *os.File
		err error
	}
	ch := make(chan opened, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		ch <- opened{f, err}
	}()
	select {
	case o := <-ch:
		return o.f, o.err
	case <-ctx.Done():
	case <-time.After(readerWait):
	}
	// Release the blocked open with a reader of our own.
	if r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
		defer r.Close()
	}
	if o := <-ch; o.f != nil {
		o.f.Close()
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return keeper.OpenOutput(path)
}

// openTerminal makes a terminal for the exec and copies between its master
// and CRI's FIFOs.
func (e *execIO) openTerminal(sio task.IO) error {
	master, slavePath, err := console.NewPty()
	if err != nil {
		return fmt.Errorf("making a terminal: %w", err)
	}
	e.console = master
	slave, err := os.OpenFile(slavePath, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return fmt.Errorf("opening the terminal: %w", err)
	}
	e.owned = append(e.owned, slave)
	e.fds = [3]*os.File{slave, slave, slave}
	out, err := keeper.OpenOutput(sio.Stdout)
	if err != nil {
		return err
	}
	e.outDone = make(chan struct{})
	go func() {
		defer close(e.outDone)
		if out == nil {
			_, _ = io.Copy(io.Discard, master)
			return
		}
		defer out.Close()
		// Ends with EIO once the sandbox has closed the terminal.
		_, _ = io.Copy(out, master)
	}()
	if sio.Stdin != "" {
		in, err := fifo.OpenFifo(context.Background(), sio.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("opening stdin: %w", err)
		}
		e.stdinSrc = in
		go func() { _, _ = io.Copy(master, in) }()
	}
	return nil
}

// files are the descriptors 0, 1 and 2 of the process.
func (e *execIO) files() []*os.File { return e.fds[:] }

// given closes the daemon's copies of what the sandbox now holds.
func (e *execIO) given() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, f := range e.owned {
		f.Close()
	}
	e.owned = nil
}

func (e *execIO) resize(w, h uint32) error {
	e.mu.Lock()
	c := e.console
	e.mu.Unlock()
	if c == nil {
		return fmt.Errorf("the process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	return c.Resize(console.WinSize{Width: uint16(w), Height: uint16(h)})
}

func (e *execIO) closeStdin() {
	e.mu.Lock()
	keep, src := e.stdinKeep, e.stdinSrc
	e.stdinKeep, e.stdinSrc = nil, nil
	e.mu.Unlock()
	if keep != nil {
		keep.Close()
	}
	if src != nil {
		src.Close()
	}
}

// drain waits, bounded, for a terminal's output to be copied out.
func (e *execIO) drain() {
	if e.outDone == nil {
		return
	}
	select {
	case <-e.outDone:
	case <-time.After(outputDrain):
	}
}

// close releases everything; it may be called more than once.
func (e *execIO) close() {
	e.given()
	e.closeStdin()
	e.mu.Lock()
	c := e.console
	e.console = nil
	e.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// startExec starts an exec in the sandbox and waits for its exit from a
// goroutine.
func (r *containers) startExec(ctx context.Context, p *task.Process) error {
	c := p.Container
	args, err := r.execArgs(c, p.Spec)
	if err != nil {
		return err
	}
	eio, err := openExecIO(ctx, p.IO)
	if err != nil {
		return err
	}
	args.Files = eio.files()
	args.GuestFDs = []int{0, 1, 2}
	args.StdioIsPty = p.IO.Terminal
	begin := time.Now()
	pid, err := r.p.ctl.Exec(ctx, args)
	eio.given()
	log.G(ctx).WithField("container", c.ID).WithField("exec", p.ExecID).WithField("took", time.Since(begin)).WithError(err).Debug("exec in the sandbox")
	if err != nil {
		eio.close()
		return fmt.Errorf("starting exec %q in the sandbox: %w", p.ExecID, err)
	}
	p.SetPid(int(pid))
	wctx, cancel := context.WithCancel(context.Background())
	d := data(p)
	d.mu.Lock()
	d.pid, d.io, d.stop = pid, eio, cancel
	d.mu.Unlock()
	go func() {
		defer cancel()
		status := lostStatus
		ws, err := r.p.ctl.WaitPID(wctx, c.ID, pid)
		switch {
		case wctx.Err() != nil:
			return
		case err == nil:
			status = statusOf(ws)
		case sentry.Gone(err) || r.p.hasEnded():
			status = 128 + int(unix.SIGKILL)
		default:
			log.G(wctx).WithError(err).WithField("exec", p.ExecID).Warn("waiting for an exec in the sandbox")
		}
		eio.drain()
		eio.close()
		p.Exited(status, time.Now())
	}()
	return nil
}

// execArgs is an exec's process as the sandbox takes it.
func (r *containers) execArgs(c *task.Container, ps *specs.Process) (*sentry.ExecArgs, error) {
	caps := ps.Capabilities
	if caps == nil && c.Spec != nil && c.Spec.Process != nil {
		caps = c.Spec.Process.Capabilities
	}
	// As runsc does: no raw sockets unless the sandbox allows them.
	drop := map[uint]bool{}
	if !slices.Contains(r.p.cli.flags, "--net-raw") && !slices.Contains(r.p.cli.flags, "--net-raw=true") {
		drop[unix.CAP_NET_RAW] = true
	}
	tc := &sentry.Capabilities{}
	if caps != nil {
		var err error
		for _, s := range []struct {
			dst   *uint64
			names []string
		}{
			{&tc.BoundingCaps, caps.Bounding}, {&tc.EffectiveCaps, caps.Effective}, {&tc.InheritableCaps, caps.Inheritable},
			{&tc.PermittedCaps, caps.Permitted}, {&tc.AmbientCaps, caps.Ambient},
		} {
			if *s.dst, err = capSet(s.names, drop); err != nil {
				return nil, err
			}
		}
	}
	args := &sentry.ExecArgs{
		Argv:             ps.Args,
		Envv:             ps.Env,
		WorkingDirectory: ps.Cwd,
		KUID:             ps.User.UID,
		KGID:             ps.User.GID,
		ExtraKGIDs:       ps.User.AdditionalGids,
		NoNewPrivileges:  ps.NoNewPrivileges,
		Capabilities:     tc,
		SupportTTYs:      true,
		ContainerID:      c.ID,
	}
	if args.WorkingDirectory == "" {
		args.WorkingDirectory = "/"
	}
	return args, nil
}
