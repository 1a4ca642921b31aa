package keeper

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

// Listen serves the keeper's socket, one keeper per socket (a lock file
// guards it); closing the listener removes the socket.
func Listen(socket string) (*unixsock.Listener, error) {
	return unixsock.Listen("unix", socket)
}

// unwantedTTL is how long the exit of a process nobody waits for is kept:
// long enough to cover the window between a process starting and its
// starter asking for it.
const unwantedTTL = 10 * time.Minute

// outputDrain bounds the wait for a terminal's output to be copied out
// after its process exited, before the exit is reported.
const outputDrain = 2 * time.Second

// Server is the keeper side. One Server runs per keeper process.
type Server struct {
	idle time.Duration
	boot string
	pid  int

	// reapMu serialises reaping.
	reapMu sync.Mutex

	mu sync.Mutex
	// commands are processes spawned with wait: their exit goes to the
	// Spawn reply, not to the records.
	commands map[int]chan Exit
	// exits are recorded exits, until acknowledged (or expired, for exits
	// nobody asked for).
	exits map[ProcessRef]*exitRecord
	// waits are closed when the exit of their process is recorded.
	waits map[ProcessRef]chan struct{}
	// wanted are processes someone waited for: their exits are kept until
	// acknowledged. unwanted were acknowledged before they exited.
	wanted   map[ProcessRef]bool
	unwanted map[ProcessRef]bool
	// dying are reaped processes whose exit is not recorded yet (their
	// terminal output is being drained).
	dying map[ProcessRef]bool
	// adopted are processes that are not children, watched through pidfds.
	adopted map[ProcessRef]bool
	// known are the processes the keeper was asked about (spawned, named
	// by a pid file, waited for): their exits are recorded. The exits of
	// other processes it reaps (orphans of host-PID containers) go to
	// recent, a small ring, where a pid file read just after its process
	// ended still finds them.
	known  map[ProcessRef]bool
	recent []exitRecord
	ios    map[string]*heldIO
	conns  int
	busyAt time.Time
}

// recentExits bounds the exits of unknown processes kept, and recentTTL
// how long.
const (
	recentExits = 256
	recentTTL   = time.Minute
)

type exitRecord struct {
	exit Exit
	at   time.Time
}

var _ api.KeeperService = (*Server)(nil)

// NewServer returns a keeper that exits after being idle (no clients, no
// children, no held streams, no unacknowledged exits anybody waited for)
// for idle; zero disables idle exit.
func NewServer(idle time.Duration) *Server {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return &Server{
		idle:     idle,
		boot:     hex.EncodeToString(b),
		pid:      os.Getpid(),
		commands: map[int]chan Exit{},
		exits:    map[ProcessRef]*exitRecord{},
		waits:    map[ProcessRef]chan struct{}{},
		wanted:   map[ProcessRef]bool{},
		unwanted: map[ProcessRef]bool{},
		dying:    map[ProcessRef]bool{},
		adopted:  map[ProcessRef]bool{},
		known:    map[ProcessRef]bool{},
		ios:      map[string]*heldIO{},
		busyAt:   time.Now(),
	}
}

// Serve makes the calling process a child subreaper, reaps its children and
// serves the keeper API on l until ctx is done or the keeper has been idle.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("becoming child subreaper: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, unix.SIGCHLD)
	defer signal.Stop(sigs)
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-sigs:
				s.reap()
			case <-t.C:
				s.expire()
			}
		}
	}()
	s.reap() // children inherited before the handler was installed

	if s.idle > 0 {
		go s.idleWatch(ctx, cancel)
	}
	srv, err := unixsock.NewServer("keeper")
	if err != nil {
		return err
	}
	api.RegisterKeeperService(srv, s)
	return unixsock.Serve(ctx, srv, &countingListener{Listener: l, s: s})
}

// countingListener counts the keeper's clients, for the idle check.
type countingListener struct {
	net.Listener
	s *Server
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.s.mu.Lock()
	l.s.conns++
	l.s.busyAt = time.Now()
	l.s.mu.Unlock()
	return &countedConn{Conn: c, s: l.s}, nil
}

type countedConn struct {
	net.Conn
	s    *Server
	once sync.Once
}

func (c *countedConn) Unwrap() net.Conn { return c.Conn }

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		c.s.conns--
		c.s.busyAt = time.Now()
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

// reap collects every exited child and routes its exit.
func (s *Server) reap() {
	s.reapMu.Lock()
	defer s.reapMu.Unlock()
	for {
		pid, err := nextZombie()
		if err != nil || pid <= 0 {
			return
		}
		// The zombie's start time is still readable: it names the process.
		start := proc.StartTime(pid)
		s.mu.Lock()
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil || got != pid {
			s.mu.Unlock()
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		e := exitFromWaitStatus(ProcessRef{Pid: pid, StartTime: start}, ws, time.Now())
		s.routeLocked(e)
		s.busyAt = time.Now()
		s.mu.Unlock()
	}
}

// nextZombie returns the pid of an exited child without reaping it (0 when
// there is none).
func nextZombie() (int, error) {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		return siginfoPid(&info), nil
	}
}

// siginfoPid is si_pid of a SIGCHLD siginfo: after si_signo, si_errno and
// si_code (and padding to 8 bytes), at the start of the union.
func siginfoPid(info *unix.Siginfo) int {
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), 16)))
}

func exitFromWaitStatus(ref ProcessRef, ws unix.WaitStatus, at time.Time) Exit {
	e := Exit{Process: ref, At: at}
	switch {
	case ws.Exited():
		e.Status = ws.ExitStatus()
	case ws.Signaled():
		e.Status = 128 + int(ws.Signal())
		e.Signaled = true
	default:
		e.Status = LostStatus
	}
	return e
}

// routeLocked delivers a reaped exit: to the Spawn call waiting for it, or
// to the records; a process holding a terminal has its exit recorded once
// its output is copied out.
func (s *Server) routeLocked(e Exit) {
	if w, ok := s.commands[e.Process.Pid]; ok {
		delete(s.commands, e.Process.Pid)
		w <- e
		return
	}
	if io := s.ownedIOLocked(e.Process); io != nil {
		s.dying[e.Process] = true
		go func() {
			io.waitOutput(outputDrain)
			s.mu.Lock()
			delete(s.dying, e.Process)
			s.recordLocked(e)
			s.releaseIOLocked(io)
			s.mu.Unlock()
		}()
		return
	}
	s.recordLocked(e)
}

// recordLocked keeps an exit until it is acknowledged (or expires, when
// nobody waited for it) and wakes its waiters. The exit of a process the
// keeper was never asked about only goes to the bounded recent ring.
func (s *Server) recordLocked(e Exit) {
	ref := e.Process
	delete(s.adopted, ref)
	switch {
	case s.unwanted[ref]:
		delete(s.unwanted, ref)
		delete(s.wanted, ref)
		delete(s.known, ref)
	case s.known[ref] || s.wanted[ref]:
		s.exits[ref] = &exitRecord{exit: e, at: time.Now()}
	default:
		if len(s.recent) >= recentExits {
			s.recent = s.recent[1:]
		}
		s.recent = append(s.recent, exitRecord{exit: e, at: time.Now()})
	}
	if ch, ok := s.waits[ref]; ok {
		close(ch)
		delete(s.waits, ref)
	}
	// Streams owned by a process that had no terminal go with it.
	if io := s.ownedIOLocked(ref); io != nil {
		s.releaseIOLocked(io)
	}
}

// expire drops exits nobody waited for once they are old.
func (s *Server) expire() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ref, r := range s.exits {
		if !s.wanted[ref] && time.Since(r.at) > unwantedTTL {
			delete(s.exits, ref)
			delete(s.known, ref)
		}
	}
	for len(s.recent) > 0 && time.Since(s.recent[0].at) > recentTTL {
		s.recent = s.recent[1:]
	}
}

// takeRecentLocked moves the exit of ref from the recent ring to the
// records, when it is there.
func (s *Server) takeRecentLocked(ref ProcessRef) (*exitRecord, bool) {
	for i, r := range s.recent {
		if r.exit.Process == ref {
			s.recent = append(s.recent[:i:i], s.recent[i+1:]...)
			s.exits[ref] = &r
			return &r, true
		}
	}
	return nil, false
}

func (s *Server) idleWatch(ctx context.Context, stop func()) {
	t := time.NewTicker(s.idle/4 + time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		busy := s.conns > 0 || len(s.ios) > 0 || len(s.commands) > 0 || len(s.dying) > 0 || len(s.adopted) > 0 || s.keptExitsLocked() || hasChildren()
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

// keptExitsLocked reports whether an exit somebody waited for is still
// unacknowledged: the daemon will come back for it.
func (s *Server) keptExitsLocked() bool {
	for ref := range s.exits {
		if s.wanted[ref] {
			return true
		}
	}
	return false
}

// hasChildren reports whether the process has any child, alive or zombie.
func hasChildren() bool {
	var info unix.Siginfo
	err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return !errors.Is(err, unix.ECHILD)
}

// Hello identifies the keeper.
func (s *Server) Hello(ctx context.Context, r *api.HelloRequest) (*api.HelloResponse, error) {
	return &api.HelloResponse{Version: ProtocolVersion, Pid: int32(s.pid), Boot: s.boot}, nil
}

// Spawn starts a process as a child of the keeper.
func (s *Server) Spawn(ctx context.Context, req *api.SpawnRequest) (_ *api.SpawnResponse, retErr error) {
	if req.GetPath() == "" || len(req.GetArgs()) == 0 {
		return nil, fmt.Errorf("spawn needs a path and arguments: %w", errdefs.ErrInvalidArgument)
	}
	if req.GetIoKey() == "" && req.GetStdio().GetTerminal() {
		return nil, fmt.Errorf("a terminal needs an io_key to be held under: %w", errdefs.ErrInvalidArgument)
	}
	io, child, err := openStdio(req.GetIoKey(), req.GetStdio())
	if err != nil {
		return nil, err
	}
	defer child.close()
	defer func() {
		if retErr != nil {
			io.release()
		}
	}()
	args := append([]string(nil), req.GetArgs()...)
	if io.sock != nil {
		placeholder := req.GetConsoleSocket()
		found := false
		for i, a := range args {
			if placeholder != "" && a == placeholder {
				args[i], found = io.sock.Path(), true
			}
		}
		if !found {
			return nil, fmt.Errorf("a terminal needs console_socket to name an argument to replace: %w", errdefs.ErrInvalidArgument)
		}
	}
	env := req.GetEnv()
	if env == nil {
		env = []string{}
	}
	attr := &syscall.ProcAttr{
		Dir:   req.GetDir(),
		Env:   env,
		Files: child.fds(),
		Sys: &syscall.SysProcAttr{
			Setsid:       req.GetSetsid(),
			Cloneflags:   uintptr(req.GetCloneflags()),
			Unshareflags: uintptr(req.GetUnshareflags()),
		},
	}

	var wait chan Exit
	s.mu.Lock()
	pid, err := syscall.ForkExec(req.GetPath(), args, attr)
	var ref ProcessRef
	if err == nil {
		// Read before the reaper (which needs s.mu) can take the child.
		ref = ProcessRef{Pid: pid, StartTime: proc.StartTime(pid)}
		if req.GetWait() {
			wait = make(chan Exit, 1)
			s.commands[pid] = wait
		} else {
			s.known[ref] = true
		}
	}
	s.busyAt = time.Now()
	started := time.Now()
	s.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", req.GetPath(), err)
	}
	child.close()
	resp := &api.SpawnResponse{Process: ref.toAPI()}
	if wait == nil {
		if io.key != "" {
			if err := s.holdIO(ctx, io, ref); err != nil {
				return nil, err
			}
		}
		return resp, nil
	}
	var e Exit
	select {
	case e = <-wait:
	case <-ctx.Done():
		// The caller gave up: end the command rather than let it finish
		// work nobody will use.
		_ = proc.Signal(ref.Pid, ref.StartTime, unix.SIGKILL)
		<-wait
		return nil, fmt.Errorf("%s did not finish in time, killed: %w", req.GetPath(), ctx.Err())
	}
	resp.Exit = e.toAPI()
	if e.Status != 0 {
		// The command failed: no process to hold streams for.
		io.release()
		return resp, nil
	}
	owner := ref
	if req.GetPidFile() != "" {
		b, err := os.ReadFile(req.GetPidFile())
		if err != nil {
			return nil, fmt.Errorf("reading pid file: %w", err)
		}
		p, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || p <= 0 {
			return nil, fmt.Errorf("bad pid file %s: %q", req.GetPidFile(), b)
		}
		if owner, err = s.childRef(p, started); err != nil {
			return nil, err
		}
		resp.Child = owner.toAPI()
	}
	if io.key == "" {
		io.release()
		return resp, nil
	}
	if err := s.holdIO(ctx, io, owner); err != nil {
		if req.GetPidFile() != "" {
			_ = proc.Signal(owner.Pid, owner.StartTime, unix.SIGKILL)
		}
		return nil, err
	}
	return resp, nil
}

// childRef names the process a pid file of a command started at since
// named: a process of that pid the keeper is now the parent of (runc has
// exited, its process is reparented to the keeper), or, if it ended
// already, the one with that pid whose exit the keeper reaped since. The
// keeper knows it from now on: its exit will be kept.
func (s *Server) childRef(pid int, since time.Time) (ProcessRef, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ref := range s.dying {
		if ref.Pid == pid {
			s.known[ref] = true
			return ref, nil
		}
	}
	if st, err := proc.ReadStat(pid); err == nil && st.PPid == s.pid {
		ref := ProcessRef{Pid: pid, StartTime: st.StartTime}
		s.known[ref] = true
		return ref, nil
	}
	var last *exitRecord
	for _, r := range s.exits {
		if r.exit.Process.Pid == pid && !r.at.Before(since) && (last == nil || r.at.After(last.at)) {
			last = r
		}
	}
	for i := range s.recent {
		if r := &s.recent[i]; r.exit.Process.Pid == pid && !r.at.Before(since) && (last == nil || r.at.After(last.at)) {
			last = r
		}
	}
	if last == nil {
		return ProcessRef{}, fmt.Errorf("process %d named by the pid file is not the keeper's child, and no exit of it is known: %w", pid, errdefs.ErrNotFound)
	}
	ref := last.exit.Process
	s.known[ref] = true
	if _, ok := s.exits[ref]; !ok {
		s.takeRecentLocked(ref)
	}
	return ref, nil
}

// holdIO keeps io for the process owner: its terminal copied, its stdin
// open. The streams go when owner exits.
func (s *Server) holdIO(ctx context.Context, io *heldIO, owner ProcessRef) error {
	if err := io.attach(ctx); err != nil {
		return err
	}
	io.owner = owner
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.ios[io.key]; ok {
		s.releaseIOLocked(old)
	}
	s.ios[io.key] = io
	if _, exited := s.exits[owner]; exited || !owner.Alive() {
		// Gone already: keep the streams only while its output drains.
		go func() {
			io.waitOutput(outputDrain)
			s.mu.Lock()
			s.releaseIOLocked(io)
			s.mu.Unlock()
		}()
	}
	return nil
}

func (s *Server) ownedIOLocked(ref ProcessRef) *heldIO {
	for _, io := range s.ios {
		if io.owner == ref {
			return io
		}
	}
	return nil
}

func (s *Server) releaseIOLocked(io *heldIO) {
	if cur, ok := s.ios[io.key]; ok && cur == io {
		delete(s.ios, io.key)
	}
	io.release()
	s.busyAt = time.Now()
}

// Wait returns the exit of a process, blocking until it exits unless
// NoBlock is set.
func (s *Server) Wait(ctx context.Context, req *api.WaitRequest) (*api.WaitResponse, error) {
	ref := refFromAPI(req.GetProcess())
	if ref.Pid <= 0 {
		return nil, fmt.Errorf("wait for pid %d: %w", ref.Pid, errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	r, ok := s.exits[ref]
	if !ok {
		r, ok = s.takeRecentLocked(ref)
	}
	if ok {
		s.wanted[ref] = true
		s.mu.Unlock()
		return &api.WaitResponse{Exit: r.exit.toAPI()}, nil
	}
	st, err := proc.ReadStat(ref.Pid)
	running := s.dying[ref] || (err == nil && (ref.StartTime == 0 || st.StartTime == ref.StartTime))
	if !running {
		s.mu.Unlock()
		return nil, fmt.Errorf("process %s: %w", ref, errdefs.ErrNotFound)
	}
	if ref.StartTime == 0 {
		ref.StartTime = st.StartTime
	}
	s.wanted[ref] = true
	delete(s.unwanted, ref)
	ch, ok := s.waits[ref]
	if !ok {
		ch = make(chan struct{})
		s.waits[ref] = ch
	}
	if !s.dying[ref] && st.PPid != s.pid && !s.adopted[ref] {
		// Not our child (its keeper is gone): watch it through a pidfd;
		// its status cannot be known.
		s.adopted[ref] = true
		go s.watchAdopted(ref)
	}
	s.mu.Unlock()
	if req.GetNoBlock() {
		return &api.WaitResponse{}, nil
	}
	select {
	case <-ch:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	r, ok = s.exits[ref]
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("exit of %s was acknowledged meanwhile: %w", ref, errdefs.ErrNotFound)
	}
	return &api.WaitResponse{Exit: r.exit.toAPI()}, nil
}

func (s *Server) watchAdopted(ref ProcessRef) {
	fd, err := proc.OpenPidfd(ref.Pid, ref.StartTime)
	if err == nil {
		for {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, -1); !errors.Is(err, unix.EINTR) {
				break
			}
		}
		unix.Close(fd)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exits[ref]; ok || !s.adopted[ref] {
		return
	}
	s.recordLocked(Exit{Process: ref, Status: LostStatus, At: time.Now(), Lost: true})
}

// Ack releases an exit, or says nobody will wait for a live process.
func (s *Server) Ack(ctx context.Context, r *api.ProcessRef) (*emptypb.Empty, error) {
	ref := refFromAPI(r)
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.wanted, ref)
	if _, ok := s.exits[ref]; ok {
		delete(s.exits, ref)
		delete(s.known, ref)
	} else if ref.Alive() || s.dying[ref] {
		s.unwanted[ref] = true
	} else {
		delete(s.known, ref)
	}
	s.busyAt = time.Now()
	return &emptypb.Empty{}, nil
}

func (s *Server) heldIO(key string) (*heldIO, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	io, ok := s.ios[key]
	if !ok {
		return nil, fmt.Errorf("no streams held under %q: %w", key, errdefs.ErrNotFound)
	}
	return io, nil
}

// ResizePty resizes a held terminal.
func (s *Server) ResizePty(ctx context.Context, r *api.ResizePtyRequest) (*emptypb.Empty, error) {
	io, err := s.heldIO(r.GetKey())
	if err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, io.resize(r.GetWidth(), r.GetHeight())
}

// CloseStdin closes the keeper's end of a held stdin.
func (s *Server) CloseStdin(ctx context.Context, r *api.IORef) (*emptypb.Empty, error) {
	io, err := s.heldIO(r.GetKey())
	if err != nil {
		return nil, err
	}
	io.closeStdin()
	return &emptypb.Empty{}, nil
}

// ReleaseIO drops held streams.
func (s *Server) ReleaseIO(ctx context.Context, r *api.IORef) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, io := range s.ios {
		if k == r.GetKey() || (r.GetPrefix() && strings.HasPrefix(k, r.GetKey())) {
			s.releaseIOLocked(io)
		}
	}
	return &emptypb.Empty{}, nil
}

// ListIO lists the keys of held streams.
func (s *Server) ListIO(ctx context.Context, _ *emptypb.Empty) (*api.ListIOResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.ios))
	for k := range s.ios {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return &api.ListIOResponse{Keys: keys}, nil
}

// Shutdown releases every held stream.
func (s *Server) Shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, io := range s.ios {
		s.releaseIOLocked(io)
	}
}
