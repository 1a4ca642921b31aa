package keeper

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

const (
	serveEnv   = "KEEPER_TEST_SERVE"
	consoleEnv = "KEEPER_TEST_CONSOLE"
)

// TestMain lets the test binary act as a keeper process, or as a command
// that sends a terminal master to a console socket, when re-executed.
func TestMain(m *testing.M) {
	if sock := os.Getenv(serveEnv); sock != "" {
		l, err := Listen(sock)
		if err != nil {
			os.Exit(2)
		}
		_ = NewServer(2*time.Second).Serve(context.Background(), l)
		os.Exit(0)
	}
	if os.Getenv(consoleEnv) != "" && len(os.Args) > 2 {
		os.Exit(sendConsole(os.Args[len(os.Args)-2], os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

// sendConsole plays runc create with --console-socket: it makes a
// terminal, starts a process writing to it (pid written to pidFile), sends
// the master and exits.
func sendConsole(sock, pidFile string) int {
	master, slave, err := console.NewPty()
	if err != nil {
		return 3
	}
	f, err := os.OpenFile(slave, os.O_RDWR, 0)
	if err != nil {
		return 4
	}
	attr := &os.ProcAttr{Files: []*os.File{f, f, f}, Sys: &unix.SysProcAttr{Setsid: true, Setctty: true}}
	p, err := os.StartProcess("/bin/sh", []string{"sh", "-c", "echo hello-tty; read line; echo got-$line; stty size"}, attr)
	if err != nil {
		return 5
	}
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(p.Pid)), 0o600); err != nil {
		return 6
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		return 7
	}
	mf := os.NewFile(master.Fd(), "master")
	if _, _, err := c.(*net.UnixConn).WriteMsgUnix([]byte("master"), unix.UnixRights(int(mf.Fd())), nil); err != nil {
		return 8
	}
	return 0
}

func startKeeper(t *testing.T) (*Client, string) {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "k.sock")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(serveEnv, sock)
	ctx := context.Background()
	c, err := Connect(ctx, Launch{Binary: self, Socket: sock, LogPath: filepath.Join(dir, "log"), Args: []string{"-test.run=^$"}})
	os.Unsetenv(serveEnv)
	if err != nil {
		t.Fatal(err)
	}
	pid := c.KeeperPid
	t.Cleanup(func() {
		c.Close()
		_ = unix.Kill(pid, unix.SIGKILL)
	})
	return c, sock
}

func TestSpawnWaitReportsExitCode(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		script string
		want   int
	}{
		{"success", "exit 0", 0},
		{"code", "exit 3", 3},
		{"signal", "kill -9 $$", 137},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := c.Spawn(ctx, &api.SpawnRequest{Path: "/bin/sh", Args: []string{"sh", "-c", tc.script}, Wait: true})
			if err != nil {
				t.Fatal(err)
			}
			if r.Exit == nil || r.Exit.Status != tc.want {
				t.Fatalf("exit %+v, want %d", r.Exit, tc.want)
			}
		})
	}
}

func TestSpawnBadRequests(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	tests := []struct {
		name string
		req  *api.SpawnRequest
		want error
	}{
		{"no path", &api.SpawnRequest{Args: []string{"x"}}, errdefs.ErrInvalidArgument},
		{"no args", &api.SpawnRequest{Path: "/bin/true"}, errdefs.ErrInvalidArgument},
		{"terminal without key", &api.SpawnRequest{Path: "/bin/true", Args: []string{"true"}, Stdio: &api.Stdio{Terminal: true}}, errdefs.ErrInvalidArgument},
		{"terminal without placeholder", &api.SpawnRequest{Path: "/bin/true", Args: []string{"true"}, IoKey: "k", Stdio: &api.Stdio{Terminal: true}}, errdefs.ErrInvalidArgument},
		{"stream URI", &api.SpawnRequest{Path: "/bin/true", Args: []string{"true"}, Stdio: &api.Stdio{Stdout: "binary:///x"}}, errdefs.ErrNotImplemented},
		{"relative stream", &api.SpawnRequest{Path: "/bin/true", Args: []string{"true"}, Stdio: &api.Stdio{Stdout: "out"}}, errdefs.ErrInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := c.Spawn(ctx, tc.req); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := c.Spawn(ctx, &api.SpawnRequest{Path: "/nonexistent", Args: []string{"x"}}); err == nil {
		t.Fatal("spawning a missing binary succeeded")
	}
}

// A command that outlives its deadline is killed, not left running.
func TestSpawnDeadlineKillsCommand(t *testing.T) {
	c, _ := startKeeper(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := c.Spawn(ctx, &api.SpawnRequest{Path: "/bin/sh", Args: []string{"sh", "-c", "echo $$ > " + pidFile + "; exec sleep 60"}, Wait: true})
	if err == nil {
		t.Fatal("a command past its deadline returned no error")
	}
	b, rerr := os.ReadFile(pidFile)
	if rerr != nil {
		t.Fatalf("command never ran: %v", rerr)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	// The keeper's deadline is the client's plus the request's transit.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("command %d still runs after its deadline", pid)
		}
	}
}

// spawnOrphan starts a process the keeper adopts (its parent exits at
// once), running script, and returns it.
func spawnOrphan(t *testing.T, c *Client, script string) ProcessRef {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "pid")
	r, err := c.Spawn(context.Background(), &api.SpawnRequest{
		Path: "/bin/sh", Args: []string{"sh", "-c", "sh -c '" + script + "' & echo $! > " + pidFile},
		Wait: true, IoKey: "orphan", PidFile: pidFile,
	})
	if err != nil || r.Exit.Status != 0 {
		t.Fatalf("spawn: %v %+v", err, r.Exit)
	}
	if r.Child.Pid == 0 || r.Child.StartTime == 0 {
		t.Fatalf("no child named: %+v", r)
	}
	return r.Child
}

// The exit of an adopted process is kept for whoever waits for it, across
// clients (a daemon restart), until acknowledged.
func TestExitKeptUntilAck(t *testing.T) {
	c, sock := startKeeper(t)
	ctx := context.Background()
	orphan := spawnOrphan(t, c, "sleep 0.3; exit 7")
	// Registered before the exit: it must be kept for us.
	if e, err := c.Wait(ctx, orphan, true); err != nil || e != nil {
		t.Fatalf("non-blocking wait of a running process: %+v %v", e, err)
	}
	c.Close()
	time.Sleep(600 * time.Millisecond)

	c2, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	e, err := c2.Wait(ctx, orphan, false)
	if err != nil || e == nil || e.Status != 7 || e.Process != orphan {
		t.Fatalf("exit %+v %v, want status 7 of %v", e, err, orphan)
	}
	if e, err := c2.Wait(ctx, orphan, true); err != nil || e == nil {
		t.Fatalf("exit not kept before ack: %+v %v", e, err)
	}
	if err := c2.Ack(ctx, orphan); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Wait(ctx, orphan, true); !errdefs.IsNotFound(err) {
		t.Fatalf("acknowledged exit still there: %v", err)
	}
}

// Processes are named by pid and start time: an exit is never handed to a
// later process that got the same pid.
func TestExitNamedByStartTime(t *testing.T) {
	s := NewServer(0)
	ctx := context.Background()
	old := ProcessRef{Pid: os.Getpid(), StartTime: 1}
	s.mu.Lock()
	s.recordLocked(Exit{Process: old, Status: 9, At: time.Now()})
	s.mu.Unlock()
	// The live process with this pid (the test itself) is not the old one.
	cur := RefOf(os.Getpid())
	r, err := s.Wait(ctx, &api.WaitRequest{Process: cur.toAPI(), NoBlock: true})
	if err != nil || r.GetExit() != nil {
		t.Fatalf("the live process got an old exit: %+v %v", r, err)
	}
	r, err = s.Wait(ctx, &api.WaitRequest{Process: old.toAPI(), NoBlock: true})
	if err != nil || r.GetExit().GetStatus() != 9 {
		t.Fatalf("old exit: %+v %v", r, err)
	}
	gone := ProcessRef{Pid: os.Getpid(), StartTime: 2}
	if _, err := s.Wait(ctx, &api.WaitRequest{Process: gone.toAPI()}); !errdefs.IsNotFound(err) {
		t.Fatalf("a process that is neither running nor recorded: %v", err)
	}
}

// An exit acknowledged before it happens is dropped, so nothing lingers.
func TestAckBeforeExitDropsIt(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	orphan := spawnOrphan(t, c, "sleep 0.2")
	if err := c.Ack(ctx, orphan); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); orphan.Alive(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("orphan did not exit")
		}
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := c.Wait(ctx, orphan, true); !errdefs.IsNotFound(err) {
		t.Fatalf("an unwanted exit was kept: %v", err)
	}
}

// A process that is not the keeper's child is watched all the same, with
// its status lost.
func TestWaitAdoptsNonChild(t *testing.T) {
	c, _ := startKeeper(t)
	p, err := os.StartProcess("/bin/sleep", []string{"sleep", "0.3"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	ref := RefOf(p.Pid)
	go p.Wait()
	e, err := c.Wait(context.Background(), ref, false)
	if err != nil || e == nil || !e.Lost || e.Status != LostStatus {
		t.Fatalf("exit of a non-child %+v %v, want lost", e, err)
	}
}

// stdioFifos makes a stdin and a stdout FIFO in dir, and opens the
// reader of stdout.
func stdioFifos(t *testing.T, dir string) (in, out string, outR *os.File) {
	t.Helper()
	in, out = filepath.Join(dir, "in"), filepath.Join(dir, "out")
	for _, p := range []string{in, out} {
		if err := unix.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	outR, err := os.OpenFile(out, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { outR.Close() })
	return in, out, outR
}

// Stdin held by the keeper stays open until CloseStdin.
func TestHeldStdin(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	dir := t.TempDir()
	in, out, outR := stdioFifos(t, dir)
	r, err := c.Spawn(ctx, &api.SpawnRequest{
		Path: "/bin/sh", Args: []string{"sh", "-c", "cat; echo eof"},
		Stdio: &api.Stdio{Stdin: in, Stdout: out}, IoKey: "k/init",
	})
	if err != nil {
		t.Fatal(err)
	}
	keys, err := c.ListIO(ctx)
	if err != nil || len(keys) != 1 || keys[0] != "k/init" {
		t.Fatalf("held streams %v %v", keys, err)
	}
	time.Sleep(200 * time.Millisecond)
	if !r.Process.Alive() {
		t.Fatal("process saw EOF on stdin before CloseStdin")
	}
	if err := c.CloseStdin(ctx, "k/init"); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx, r.Process, false)
	if err != nil || e.Status != 0 {
		t.Fatalf("exit %+v %v", e, err)
	}
	if err := unix.SetNonblock(int(outR.Fd()), false); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(outR).ReadString('\n')
	if line != "eof\n" {
		t.Fatalf("output %q", line)
	}
	// The streams went with the process.
	if keys, _ := c.ListIO(ctx); len(keys) != 0 {
		t.Fatalf("streams still held after exit: %v", keys)
	}
}

// A terminal is taken from the console socket, copied both ways, resized,
// and its output is out before the exit is reported.
func TestTerminal(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	dir := t.TempDir()
	in, out, outR := stdioFifos(t, dir)
	inW, err := os.OpenFile(in, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer inW.Close()
	self, _ := os.Executable()
	pidFile := filepath.Join(dir, "pid")
	r, err := c.Spawn(ctx, &api.SpawnRequest{
		Path: self, Args: []string{self, "-test.run=^$", "@console@", pidFile},
		Env:   []string{consoleEnv + "=1"},
		Stdio: &api.Stdio{Stdin: in, Stdout: out, Terminal: true},
		IoKey: "k/tty", ConsoleSocket: "@console@", PidFile: pidFile, Wait: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.Exit.Status != 0 {
		t.Fatalf("console sender exited %d", r.Exit.Status)
	}
	if err := c.ResizePty(ctx, "k/tty", 91, 23); err != nil {
		t.Fatal(err)
	}
	if _, err := inW.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx, r.Child, false)
	if err != nil || e.Status != 0 {
		t.Fatalf("exit %+v %v", e, err)
	}
	if err := unix.SetNonblock(int(outR.Fd()), false); err != nil {
		t.Fatal(err)
	}
	outR.SetReadDeadline(time.Now().Add(5 * time.Second))
	var got strings.Builder
	br := bufio.NewReader(outR)
	for !strings.Contains(got.String(), "23 91") {
		line, err := br.ReadString('\n')
		got.WriteString(line)
		if err != nil {
			t.Fatalf("terminal output %q: %v", got.String(), err)
		}
	}
	for _, want := range []string{"hello-tty", "got-x"} {
		if !strings.Contains(got.String(), want) {
			t.Fatalf("terminal output %q lacks %q", got.String(), want)
		}
	}
	if keys, _ := c.ListIO(ctx); len(keys) != 0 {
		t.Fatalf("terminal still held after exit: %v", keys)
	}
}

func TestReleaseIOPrefix(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	dir := t.TempDir()
	var refs []ProcessRef
	for i, k := range []string{"ns/a/init", "ns/a/exec/1", "ns/b/init"} {
		in := filepath.Join(dir, strconv.Itoa(i))
		if err := unix.Mkfifo(in, 0o600); err != nil {
			t.Fatal(err)
		}
		r, err := c.Spawn(ctx, &api.SpawnRequest{Path: "/bin/cat", Args: []string{"cat"}, Stdio: &api.Stdio{Stdin: in}, IoKey: k})
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, r.Process)
	}
	if err := c.ReleaseIO(ctx, "ns/a/", true); err != nil {
		t.Fatal(err)
	}
	for _, ref := range refs[:2] {
		if e, err := c.Wait(ctx, ref, false); err != nil || e.Status != 0 {
			t.Fatalf("released cat %v: %+v %v", ref, e, err)
		}
	}
	keys, _ := c.ListIO(ctx)
	if len(keys) != 1 || keys[0] != "ns/b/init" {
		t.Fatalf("held after release: %v", keys)
	}
	if err := c.ReleaseIO(ctx, "ns/b/init", false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, refs[2], false); err != nil {
		t.Fatal(err)
	}
}

// The keeper stays while an exit somebody waited for is unacknowledged
// (the daemon will come back for it), and goes once it is acknowledged and
// nothing else is held: an init whose exit was acknowledged does not keep
// it forever.
func TestIdleExitWaitsForAcks(t *testing.T) {
	c, sock := startKeeper(t)
	ctx := context.Background()
	pid := c.KeeperPid
	orphan := spawnOrphan(t, c, "sleep 0.2; exit 0")
	if _, err := c.Wait(ctx, orphan, false); err != nil {
		t.Fatal(err)
	}
	c.Close()
	time.Sleep(3500 * time.Millisecond) // past the test keeper's 2 s idle time
	if unix.Kill(pid, 0) != nil {
		t.Fatal("the keeper left with an unacknowledged exit")
	}
	c2, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.Ack(ctx, orphan); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	for deadline := time.Now().Add(10 * time.Second); unix.Kill(pid, 0) == nil; time.Sleep(100 * time.Millisecond) {
		if st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && strings.Contains(string(st), ") Z ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an idle keeper with nothing held did not exit")
		}
	}
}

// Orphans of a host-PID container, reparented to the keeper, are processes
// nobody asked about: their exits go to a small bounded ring, not to the
// records (a container forking in a loop cannot grow the keeper).
func TestUnknownExitsBounded(t *testing.T) {
	s := NewServer(0)
	for pid := 1; pid <= 3*recentExits; pid++ {
		s.mu.Lock()
		s.recordLocked(Exit{Process: ProcessRef{Pid: 100000 + pid, StartTime: 1}, At: time.Now()})
		s.mu.Unlock()
	}
	if len(s.exits) != 0 || len(s.recent) != recentExits {
		t.Fatalf("exits kept: %d recorded, %d recent (bound %d)", len(s.exits), len(s.recent), recentExits)
	}
	// A pid file read just after its process ended still finds it.
	last := ProcessRef{Pid: 100000 + 3*recentExits, StartTime: 1}
	ref, err := s.childRef(last.Pid, time.Now().Add(-time.Minute))
	if err != nil || ref != last {
		t.Fatalf("childRef of a process that just ended: %v %v", ref, err)
	}
	if _, ok := s.exits[last]; !ok {
		t.Fatal("the named process's exit is not kept for its waiter")
	}
	if _, err := s.childRef(1, time.Now()); err == nil {
		t.Fatal("a pid that is neither a child nor a recent exit was named")
	}
}
