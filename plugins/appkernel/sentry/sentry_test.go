package sentry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// containerManager stands for the sentry's: urpc names methods after the
// type, as the sentry's are ("containerManager.Wait").
type containerManager struct {
	mu       sync.Mutex
	statuses map[string]uint32
	signals  []signalArgs
	execOut  string
	release  chan struct{} // closed to let a blocked Wait answer
}

func (cm *containerManager) Wait(cid *string, ws *uint32) error {
	if *cid == "blocks" {
		<-cm.release
	}
	cm.mu.Lock()
	defer cm.mu.Unlock()
	st, ok := cm.statuses[*cid]
	if !ok {
		return fmt.Errorf("container %q not found", *cid)
	}
	*ws = st
	return nil
}

func (cm *containerManager) WaitPID(args *waitPIDArgs, ws *uint32) error {
	if args.PID != 7 {
		return fmt.Errorf("waiting for PID %d: no such process", args.PID)
	}
	*ws = 3 << 8
	return nil
}

func (cm *containerManager) ExecuteAsync(args *ExecArgs, pid *int32) error {
	defer func() {
		for _, f := range args.Files {
			f.Close()
		}
	}()
	if args.ContainerID != "c1" || len(args.Files) != 2 || args.GuestFDs[1] != 1 {
		return fmt.Errorf("unexpected exec %+v", args)
	}
	// Write to what the process would get as its stdout.
	if _, err := io.WriteString(args.Files[1], cm.execOut); err != nil {
		return err
	}
	*pid = 7
	return nil
}

func (cm *containerManager) Signal(args *signalArgs, _ *struct{}) error {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	cm.signals = append(cm.signals, *args)
	return nil
}

func (cm *containerManager) Processes(cid *string, out *[]Process) error {
	*out = []Process{{PID: 1, Cmd: "sh"}, {PID: 7, PPID: 1, Cmd: "sleep"}}
	return nil
}

func (cm *containerManager) ContainerRuntimeState(cid *string, out *RuntimeState) error {
	*out = StateRunning
	return nil
}

func (cm *containerManager) Event(cid *string, out *EventOut) error {
	out.Event.ID = *cid
	out.Event.Data.Memory.Usage.Usage = 4096
	out.Event.Data.Pids.Current = 2
	out.ContainerUsage = map[string]uint64{*cid: 1500}
	return nil
}

// serve runs a control server on path until the test ends.
func serve(t *testing.T, path string, cm *containerManager) {
	t.Helper()
	addr := path
	if len(addr) >= len(unix.RawSockaddrUnix{}.Path) {
		dir, err := os.Open(filepath.Dir(path))
		if err != nil {
			t.Fatal(err)
		}
		defer dir.Close()
		addr = fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path))
	}
	ss, err := unet.BindAndListen(addr, false)
	if err != nil {
		t.Fatal(err)
	}
	srv := urpc.NewServer()
	srv.Register(cm)
	go func() {
		for {
			s, err := ss.Accept()
			if err != nil {
				return
			}
			srv.StartHandling(s)
		}
	}()
	t.Cleanup(func() {
		ss.Close()
		srv.Stop(time.Second)
	})
}

func newServer(t *testing.T, dir string) (*Client, *containerManager) {
	cm := &containerManager{
		statuses: map[string]uint32{"c1": 0x0f, "c2": 2 << 8, "blocks": 1 << 8},
		execOut:  "hello\n",
		release:  make(chan struct{}),
	}
	path := SocketPath(dir, strings.Repeat("a", 64))
	serve(t, path, cm)
	return New(path), cm
}

func TestCalls(t *testing.T) {
	// A root long enough that the socket's path cannot be a Unix socket
	// address, as with a CRI sandbox ID under a daemon's state directory.
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 40))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	c, cm := newServer(t, dir)
	ctx := context.Background()

	waits := []struct {
		cid      string
		exited   bool
		code     int
		signaled bool
		sig      unix.Signal
		notFound bool
	}{
		{cid: "c1", signaled: true, sig: unix.SIGTERM},
		{cid: "c2", exited: true, code: 2},
		{cid: "nope", notFound: true},
	}
	for _, w := range waits {
		ws, err := c.Wait(ctx, w.cid)
		if w.notFound {
			if !errdefs.IsNotFound(err) {
				t.Errorf("Wait(%s): %v, want not found", w.cid, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("Wait(%s): %v", w.cid, err)
		}
		if ws.Exited() != w.exited || ws.Signaled() != w.signaled || (w.exited && ws.ExitStatus() != w.code) || (w.signaled && ws.Signal() != w.sig) {
			t.Errorf("Wait(%s) = %#x", w.cid, uint32(ws))
		}
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	args := &ExecArgs{Argv: []string{"sh"}, ContainerID: "c1", GuestFDs: []int{0, 1}}
	args.Files = []*os.File{null, w}
	pid, err := c.Exec(ctx, args)
	w.Close()
	if err != nil || pid != 7 {
		t.Fatalf("Exec = %d, %v", pid, err)
	}
	if out, _ := io.ReadAll(r); string(out) != "hello\n" {
		t.Errorf("exec output %q", out)
	}
	args.GuestFDs = []int{0}
	if _, err := c.Exec(ctx, args); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Exec with a descriptor missing: %v", err)
	}

	if ws, err := c.WaitPID(ctx, "c1", 7); err != nil || ws.ExitStatus() != 3 {
		t.Errorf("WaitPID = %#x, %v", uint32(ws), err)
	}
	if _, err := c.WaitPID(ctx, "c1", 8); !errdefs.IsNotFound(err) {
		t.Errorf("WaitPID of an unknown pid: %v", err)
	}

	if err := c.Signal(ctx, "c1", 0, unix.SIGKILL, ToAll); err != nil {
		t.Fatal(err)
	}
	cm.mu.Lock()
	if len(cm.signals) != 1 || cm.signals[0] != (signalArgs{CID: "c1", Signo: 9, Mode: ToAll}) {
		t.Errorf("signals %+v", cm.signals)
	}
	cm.mu.Unlock()

	ps, err := c.Processes(ctx, "c1")
	if err != nil || len(ps) != 2 || ps[1].PID != 7 || ps[1].Cmd != "sleep" {
		t.Errorf("Processes = %+v, %v", ps, err)
	}
	if st, err := c.State(ctx, "c1"); err != nil || st != StateRunning {
		t.Errorf("State = %v, %v", st, err)
	}
	ev, err := c.Event(ctx, "c1")
	if err != nil || ev.Event.Data.Memory.Usage.Usage != 4096 || ev.ContainerUsage["c1"] != 1500 || ev.Event.Data.Pids.Current != 2 {
		t.Errorf("Event = %+v, %v", ev, err)
	}
}

func TestWaitCancelled(t *testing.T) {
	c, cm := newServer(t, t.TempDir())
	defer close(cm.release)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := c.Wait(ctx, "blocks")
		errc <- err
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled Wait: %v", err)
	}
}

func TestGone(t *testing.T) {
	c := New(SocketPath(t.TempDir(), "x"))
	_, err := c.Wait(context.Background(), "x")
	if !Gone(err) || !errdefs.IsNotFound(err) {
		t.Errorf("Wait on a missing socket: %v", err)
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err   error
		check func(error) bool
		gone  bool
	}{
		{urpc.RemoteError{Message: `container "x" not started`}, errdefs.IsFailedPrecondition, false},
		{urpc.RemoteError{Message: "waiting for PID 3: no such process"}, errdefs.IsNotFound, false},
		{urpc.RemoteError{Message: `container "c" has stopped`}, errdefs.IsNotFound, false},
		{urpc.RemoteError{Message: "something else"}, errdefs.IsUnknown, false},
		{io.EOF, errdefs.IsUnavailable, true},
	} {
		err := classify("m", tc.err)
		if !tc.check(err) || Gone(err) != tc.gone {
			t.Errorf("classify(%v) = %v", tc.err, err)
		}
	}
}
