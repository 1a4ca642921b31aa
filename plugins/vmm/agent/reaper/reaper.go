// Package reaper collects the exits of the guest agent's children. The
// agent is PID 1 of the guest, so every orphan of the guest (a container's
// process once runc has exited, a daemon's double fork) becomes its child
// and must be reaped, while the children the agent starts through os/exec
// must be left to exec.Cmd.Wait.
//
// On each SIGCHLD the reaper looks for zombie children in /proc and reaps
// those os/exec does not own: their status goes to whoever watches the pid
// (the task service watches container processes), or is kept for a while
// for a watcher that comes late (a container that exits before runc has
// told the pid).
package reaper

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Exit is the end of a process.
type Exit struct {
	Pid    int
	Status unix.WaitStatus
	At     time.Time
}

// Code is the exit status in containerd's convention: the exit code, or
// 128+signal.
func (e Exit) Code() int {
	if e.Status.Signaled() {
		return 128 + int(e.Status.Signal())
	}
	return e.Status.ExitStatus()
}

// keepUnwatched bounds the exits kept for a watcher that has not come.
const keepUnwatched = 1024

// Reaper reaps the children of its process.
type Reaper struct {
	mu        sync.Mutex
	exec      map[int]bool        // owned by exec.Cmd.Wait
	watchers  map[int][]chan Exit // pid -> waiting
	unwatched map[int]Exit        // reaped with nobody waiting
	order     []int               // of unwatched, oldest first
	proc      string              // /proc
	wait4     func(pid int) (Exit, bool)
}

// New returns a reaper; Run starts it.
func New() *Reaper {
	r := &Reaper{exec: map[int]bool{}, watchers: map[int][]chan Exit{}, unwatched: map[int]Exit{}, proc: "/proc"}
	r.wait4 = wait4
	return r
}

// Run reaps on every SIGCHLD (and every few seconds, in case a signal was
// coalesced away) until ctx is done.
func (r *Reaper) Run(ctx context.Context) {
	sig := make(chan os.Signal, 16)
	signal.Notify(sig, syscall.SIGCHLD)
	defer signal.Stop(sig)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		r.Reap(ctx)
		select {
		case <-ctx.Done():
			return
		case <-sig:
		case <-tick.C:
		}
	}
}

// Start starts cmd; exec.Cmd.Wait reaps it. Use it (not cmd.Start) for
// every child the agent waits for through os/exec.
func (r *Reaper) Start(cmd *exec.Cmd) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	r.exec[cmd.Process.Pid] = true
	return nil
}

// Exec is Start and Wait, releasing the pid afterwards.
func (r *Reaper) Exec(cmd *exec.Cmd) error {
	if err := r.Start(cmd); err != nil {
		return err
	}
	err := cmd.Wait()
	r.Done(cmd.Process.Pid)
	return err
}

// Done releases a pid started with Start, once exec.Cmd.Wait returned.
func (r *Reaper) Done(pid int) {
	r.mu.Lock()
	delete(r.exec, pid)
	r.mu.Unlock()
}

// Watch returns a channel that receives the exit of pid, a process the
// agent did not start through os/exec (a container's process). If it has
// exited already and was reaped, the exit comes at once.
func (r *Reaper) Watch(pid int) <-chan Exit {
	ch := make(chan Exit, 1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.unwatched[pid]; ok {
		delete(r.unwatched, pid)
		ch <- e
		return ch
	}
	r.watchers[pid] = append(r.watchers[pid], ch)
	return ch
}

// Reap reaps every zombie child not owned by os/exec.
func (r *Reaper) Reap(ctx context.Context) {
	for _, pid := range r.zombies() {
		r.mu.Lock()
		owned := r.exec[pid]
		r.mu.Unlock()
		if owned {
			continue
		}
		e, ok := r.wait4(pid)
		if !ok {
			continue
		}
		r.deliver(ctx, e)
	}
}

func (r *Reaper) deliver(ctx context.Context, e Exit) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ws := r.watchers[e.Pid]; len(ws) > 0 {
		delete(r.watchers, e.Pid)
		for _, w := range ws {
			w <- e
		}
		return
	}
	log.G(ctx).WithField("pid", e.Pid).WithField("status", e.Code()).Debug("reaped an unwatched process")
	if _, ok := r.unwatched[e.Pid]; !ok {
		r.order = append(r.order, e.Pid)
	}
	r.unwatched[e.Pid] = e
	for len(r.order) > keepUnwatched {
		delete(r.unwatched, r.order[0])
		r.order = r.order[1:]
	}
}

// zombies lists the zombie children of this process.
func (r *Reaper) zombies() []int {
	self := os.Getpid()
	ents, err := os.ReadDir(r.proc)
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(r.proc, e.Name(), "stat"))
		if err != nil {
			continue
		}
		state, ppid, ok := parseStat(b)
		if ok && state == 'Z' && ppid == self {
			out = append(out, pid)
		}
	}
	return out
}

// parseStat reads the state and parent of /proc/PID/stat.
func parseStat(b []byte) (state byte, ppid int, ok bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0, false
	}
	f := bytes.Fields(b[i+2:])
	if len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, false
	}
	p, err := strconv.Atoi(string(f[1]))
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], p, true
}

func wait4(pid int) (Exit, bool) {
	var ws unix.WaitStatus
	for {
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || got != pid {
			return Exit{}, false
		}
		return Exit{Pid: pid, Status: ws, At: time.Now()}, true
	}
}
