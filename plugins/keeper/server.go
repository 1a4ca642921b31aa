package keeper

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
)

// Listen serves the keeper's socket, one keeper per socket (a lock file
// guards it); closing the listener removes the socket.
func Listen(socket string) (*unixsock.Listener, error) {
	return unixsock.Listen("unixpacket", socket)
}

// Server is the keeper side. One Server runs per keeper process.
type Server struct {
	idle time.Duration

	// reapMu is held across reaping and routing an exit, so that a sync
	// never overtakes an exit already collected.
	reapMu sync.Mutex

	mu      sync.Mutex
	waiters map[int]chan Exit // spawned with Wait: exit goes to the reply
	exits   map[int]Exit      // reaped, not yet acknowledged
	order   []int             // pids of exits in reap order
	fds     map[string]*os.File
	subs    map[*serverConn]struct{}
	clients int
	busyAt  time.Time
}

// NewServer returns a keeper that exits after being idle (no clients, no
// children, no held descriptors, no unacknowledged exits) for idle; zero
// disables idle exit.
func NewServer(idle time.Duration) *Server {
	return &Server{
		idle:    idle,
		waiters: map[int]chan Exit{},
		exits:   map[int]Exit{},
		fds:     map[string]*os.File{},
		subs:    map[*serverConn]struct{}{},
		busyAt:  time.Now(),
	}
}

// Serve makes the calling process a child subreaper, reaps its children and
// serves clients on l until ctx is done or the keeper has been idle.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener) error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("becoming child subreaper: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, unix.SIGCHLD)
	defer signal.Stop(sigs)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-sigs:
				s.reap()
			}
		}
	}()
	s.reap() // children inherited before the handler was installed

	if s.idle > 0 {
		go s.idleWatch(ctx, cancel)
	}
	unixsock.Accept(ctx, l, "keeper", func(c *net.UnixConn) {
		sc := &serverConn{conn: newConn(c), s: s, out: make(chan outgoing, 1024), done: make(chan struct{})}
		s.mu.Lock()
		s.clients++
		s.mu.Unlock()
		go sc.serve(ctx)
	})
	return nil
}

// reap collects every exited child and routes its status.
func (s *Server) reap() {
	s.reapMu.Lock()
	defer s.reapMu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		e := exitFromWaitStatus(pid, ws, time.Now())
		s.mu.Lock()
		if w, ok := s.waiters[pid]; ok {
			delete(s.waiters, pid)
			w <- e
		} else {
			s.exits[pid] = e
			s.order = append(s.order, pid)
			for sc := range s.subs {
				sc.event(e)
			}
		}
		s.busyAt = time.Now()
		s.mu.Unlock()
	}
}

func (s *Server) idleWatch(ctx context.Context, stop func()) {
	t := time.NewTicker(s.idle / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		busy := s.clients > 0 || len(s.fds) > 0 || len(s.exits) > 0 || len(s.waiters) > 0 || hasChildren()
		if busy {
			s.busyAt = time.Now()
		}
		idleFor := time.Since(s.busyAt)
		s.mu.Unlock()
		if idleFor >= s.idle {
			log.G(ctx).Info("keeper idle: no children, clients or held state; exiting")
			stop()
			return
		}
	}
}

// hasChildren reports whether the process has any child, alive or zombie.
func hasChildren() bool {
	var info unix.Siginfo
	err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return err != unix.ECHILD
}

// serverConn is one client. Replies and exit events leave through one
// queue, in order: a reply is never sent ahead of an event queued before it.
type serverConn struct {
	conn
	s    *Server
	out  chan outgoing
	done chan struct{}
}

type outgoing struct {
	m     *message
	files []*os.File // owned by the queue: closed once sent
}

func (c *serverConn) writer() {
	for {
		select {
		case o := <-c.out:
			if err := c.send(o.m, o.files...); err != nil {
				log.L.WithError(err).Debug("keeper send")
			}
			closeAll(o.files)
		case <-c.done:
			for {
				select {
				case o := <-c.out:
					closeAll(o.files)
				default:
					return
				}
			}
		}
	}
}

// reply queues m; the files are closed after sending.
func (c *serverConn) reply(m *message, files ...*os.File) {
	select {
	case c.out <- outgoing{m, files}:
	case <-c.done:
		closeAll(files)
	}
}

// event is called with s.mu held.
func (c *serverConn) event(e Exit) {
	ev := e
	c.reply(&message{Op: opExit, Exit: &ev})
}

func (c *serverConn) serve(ctx context.Context) {
	go c.writer()
	defer func() {
		c.s.mu.Lock()
		c.s.clients--
		delete(c.s.subs, c)
		c.s.busyAt = time.Now()
		c.s.mu.Unlock()
		close(c.done)
		c.c.Close()
	}()
	for {
		m, files, err := c.recv()
		if err != nil {
			return
		}
		go c.handle(ctx, m, files)
	}
}

func (c *serverConn) handle(ctx context.Context, m *message, files []*os.File) {
	s := c.s
	r := &message{ID: m.ID}
	switch m.Op {
	case opHello:
		r.Version = ProtocolVersion
		r.Pid = os.Getpid()
	case opSpawn:
		pid, exit, err := s.spawn(m.Spawn, files)
		closeAll(files)
		files = nil
		if err != nil {
			r.Error = err.Error()
		}
		r.Pid, r.Exit = pid, exit
	case opSync:
		// Every exit reaped so far is queued before this reply.
		s.reap()
	case opSubscribe:
		s.mu.Lock()
		// The backlog rides on the reply; later exits arrive as events.
		s.subs[c] = struct{}{}
		for _, pid := range s.order {
			if e, ok := s.exits[pid]; ok {
				r.Exits = append(r.Exits, e)
			}
		}
		s.mu.Unlock()
	case opAck:
		s.mu.Lock()
		for _, pid := range m.Pids {
			delete(s.exits, pid)
		}
		kept := s.order[:0]
		for _, pid := range s.order {
			if _, ok := s.exits[pid]; ok {
				kept = append(kept, pid)
			}
		}
		s.order = kept
		s.mu.Unlock()
	case opPutFD:
		if len(files) != 1 || m.Key == "" {
			r.Error = "putfd needs a key and exactly one descriptor"
			break
		}
		s.mu.Lock()
		if old, ok := s.fds[m.Key]; ok {
			old.Close()
		}
		s.fds[m.Key] = files[0]
		s.mu.Unlock()
		files = nil
	case opGetFD:
		s.mu.Lock()
		f, ok := s.fds[m.Key]
		var dup *os.File
		var derr error
		if ok {
			var fd int
			if fd, derr = unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0); derr == nil {
				dup = os.NewFile(uintptr(fd), f.Name())
			}
		}
		s.mu.Unlock()
		if !ok {
			r.Error = errNoFD.Error()
			break
		}
		if derr != nil {
			r.Error = derr.Error()
			break
		}
		c.reply(r, dup)
		return
	case opDropFD:
		s.mu.Lock()
		for k, f := range s.fds {
			if k == m.Key || (m.Prefix && len(k) >= len(m.Key) && k[:len(m.Key)] == m.Key) {
				f.Close()
				delete(s.fds, k)
			}
		}
		s.mu.Unlock()
	default:
		r.Error = fmt.Sprintf("unknown keeper operation %q", m.Op)
	}
	closeAll(files)
	c.reply(r)
}

func (s *Server) spawn(req *SpawnRequest, files []*os.File) (int, *Exit, error) {
	if req == nil || req.Path == "" || len(req.Args) == 0 {
		return 0, nil, errors.New("spawn needs a path and arguments")
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, nil, err
	}
	defer devnull.Close()
	pick := func(i int) (uintptr, error) {
		if i == NoFD {
			return devnull.Fd(), nil
		}
		if i < 0 || i >= len(files) {
			return 0, fmt.Errorf("descriptor index %d out of range (%d attached)", i, len(files))
		}
		return files[i].Fd(), nil
	}
	var fds []uintptr
	for _, i := range append(req.Stdio[:], req.Extra...) {
		fd, err := pick(i)
		if err != nil {
			return 0, nil, err
		}
		fds = append(fds, fd)
	}
	attr := &syscall.ProcAttr{
		Dir:   req.Dir,
		Env:   req.Env,
		Files: fds,
		Sys: &syscall.SysProcAttr{
			Setsid:     req.Setsid,
			Cloneflags: req.Cloneflags,
		},
	}
	if attr.Env == nil {
		attr.Env = []string{}
	}

	var wait chan Exit
	s.mu.Lock()
	pid, err := syscall.ForkExec(req.Path, req.Args, attr)
	if err == nil && req.Wait {
		wait = make(chan Exit, 1)
		s.waiters[pid] = wait
	}
	s.busyAt = time.Now()
	s.mu.Unlock()
	if err != nil {
		return 0, nil, fmt.Errorf("starting %s: %w", req.Path, err)
	}
	if wait == nil {
		return pid, nil, nil
	}
	e := <-wait
	return pid, &e, nil
}

// Shutdown closes every held descriptor.
func (s *Server) Shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, f := range s.fds {
		f.Close()
		delete(s.fds, k)
	}
}
