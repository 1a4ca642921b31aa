//go:build e2e || bench

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/channel"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu"
)

// TestVMMBoot boots the guest image of `make guest` under QEMU, with no
// controller, the way the kuasar-vmm controller will: Prepare, spawn the
// launch (here as a child of the test; the keeper in the daemon), Attach by
// the pid file and QMP, reach the agent over the channel with ttrpc. It
// checks the agent's API, a reconnect after the host side is cut in the
// middle of a frame, both ways to stop the VM, and that nothing is left.
// It prints the floor of a VM pod's start: QEMU exec to the agent's first
// hello, over a few boots, and the PSS of one VM.
func TestVMMBoot(t *testing.T) {
	bin, err := qemu.FindBinary("")
	if err != nil {
		t.Skipf("skipping the microVM boot test: %v", err)
	}
	img := guestImage(t)
	accel, err := hypervisor.ResolveAccel("auto", hypervisor.KVMUsable())
	if err != nil {
		t.Fatal(err)
	}
	memMiB, tbMiB := envInt("KUASAR_VMM_MEMORY_MIB", 128), envInt("KUASAR_VMM_TB_MIB", 64)
	boots := envInt("KUASAR_VMM_BOOTS", 3)
	t.Logf("qemu %s, accel %s, 1 vCPU, %d MiB, tb-size %d MiB, image %s (kernel %s)", bin, accel, memMiB, tbMiB, img.Key, img.KernelRelease)

	var toHello, toReady []time.Duration
	for i := range boots {
		t.Run(fmt.Sprintf("boot%d", i), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			b := bootVM(ctx, t, img, accel, memMiB, tbMiB)
			if b.hello == 0 {
				t.Fatal("the session started without the agent's hello")
			}
			toHello = append(toHello, b.hello)
			toReady = append(toReady, b.ready)

			// The first boot goes through everything; the others measure.
			if i == 0 {
				checkAgent(ctx, t, b)
				checkReconnect(ctx, t, b)
				checkReattach(ctx, t, b)
				pss := waitModulesThenPSS(ctx, t, b)
				t.Logf("QEMU PSS with the agent idle, modules loaded: %.1f MiB", float64(pss)/1024)
				// Stop through the agent: the guest powers off, QEMU exits.
				if _, err := b.agent.Shutdown(ctx, &agentapi.ShutdownRequest{}); err != nil {
					t.Fatalf("Shutdown: %v", err)
				}
				if err := b.vm.Wait(ctx); err != nil {
					t.Fatalf("QEMU did not exit after the guest powered off: %v", err)
				}
			} else {
				// Stop through QMP quit.
				if err := b.vm.Stop(ctx); err != nil {
					t.Fatalf("Stop: %v", err)
				}
			}
			b.cleanupAndCheck(t)
		})
	}
	t.Logf("QEMU exec to the agent's first hello (floor), %d boots: p50 %v, all %v", len(toHello), p50(toHello), toHello)
	t.Logf("QEMU exec to the Hello reply over ttrpc:            p50 %v, all %v", p50(toReady), toReady)
}

// bootedVM is a VM of the test and what reaches it.
type bootedVM struct {
	st      hypervisor.State
	vm      *qemu.VM
	cmd     *exec.Cmd
	conn    net.Conn
	client  *ttrpc.Client
	agent   agentapi.AgentClient
	hello   time.Duration // exec to the first channel hello (0: none heard)
	ready   time.Duration // exec to Hello's reply
	started time.Time
	reaped  chan struct{}
}

func bootVM(ctx context.Context, t *testing.T, img *guest.Image, accel hypervisor.Accel, memMiB, tbMiB int) *bootedVM {
	t.Helper()
	b := spawnVM(ctx, t, vmConfig(t, img, accel, memMiB, tbMiB))
	b.dialAgent(ctx, t)
	return b
}

// vmConfig is the test's VM, in a run directory of its own.
func vmConfig(t *testing.T, img *guest.Image, accel hypervisor.Accel, memMiB, tbMiB int) hypervisor.Config {
	// A short run directory: Unix socket paths are limited to 107 bytes.
	runDir, err := os.MkdirTemp("", "kv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(runDir) })
	// A shared directory as the pod's will be (9p): QEMU must take it; the
	// guest does not mount it yet.
	share := filepath.Join(runDir, "shared")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	return hypervisor.Config{
		ID: filepath.Base(runDir), RunDir: runDir, Kernel: img.Kernel, Initrd: img.Initrd,
		VCPUs: 1, MemoryMiB: memMiB, Accel: accel, TBSizeMiB: tbMiB, HotplugSlots: 1,
		Shares: []hypervisor.Share{{Tag: "kuasar", Path: share}},
	}
}

// spawnVM prepares and starts QEMU (as the test's child; the keeper's in
// the daemon) and attaches to it.
func spawnVM(ctx context.Context, t *testing.T, cfg hypervisor.Config) *bootedVM {
	t.Helper()
	launch, st, err := qemu.Driver{}.Prepare(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(launch.Path, launch.Args...)
	cmd.Dir = launch.Dir
	out, err := os.Create(launch.Log)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	b := &bootedVM{st: st, cmd: cmd, reaped: make(chan struct{}), started: time.Now()}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(b.reaped) }()
	t.Cleanup(func() { b.kill(t) })

	vm, err := qemu.Attach(ctx, st)
	if err != nil {
		t.Fatalf("attach: %v%s", err, b.logs())
	}
	b.vm, b.st = vm, vm.State()
	if b.st.Pid != cmd.Process.Pid {
		t.Errorf("pid file says %d, QEMU is %d", b.st.Pid, cmd.Process.Pid)
	}
	return b
}

// dialAgent starts a session with the agent and says Hello, timing both
// from QEMU's exec.
func (b *bootedVM) dialAgent(ctx context.Context, t *testing.T) {
	t.Helper()
	conn, err := b.vm.DialAgent(ctx)
	if err != nil {
		t.Fatalf("agent channel: %v%s", err, b.logs())
	}
	if _, helloAt := conn.(*channel.Conn).Hello(); !helloAt.IsZero() {
		b.hello = helloAt.Sub(b.started)
	}
	b.connect(conn)
	if _, err := b.agent.Hello(ctx, &agentapi.HelloRequest{Version: agentapi.ProtocolVersion}); err != nil {
		t.Fatalf("Hello: %v%s", err, b.logs())
	}
	b.ready = time.Since(b.started)
}

func (b *bootedVM) connect(conn net.Conn) {
	if b.client != nil {
		b.client.Close()
	}
	b.conn = conn
	b.client = ttrpc.NewClient(conn)
	b.agent = agentapi.NewAgentClient(b.client)
}

// logs returns QEMU's output and the guest console, for failures.
func (b *bootedVM) logs() string {
	var s strings.Builder
	f := filepath.Join(b.st.RunDir, "qemu.log")
	if data, err := os.ReadFile(f); err == nil && len(data) > 0 {
		fmt.Fprintf(&s, "\n--- %s:\n%s", f, data[max(0, len(data)-4000):])
	}
	if b.vm != nil {
		fmt.Fprintf(&s, "\n--- the guest's console:\n%s", b.vm.Console(context.Background(), 4000))
	}
	return s.String()
}

// kill ends the test's QEMU whatever happened (by pid: it is the test's
// child, and only that).
func (b *bootedVM) kill(t *testing.T) {
	if b.client != nil {
		b.client.Close()
	}
	select {
	case <-b.reaped:
	default:
		b.cmd.Process.Kill()
		select {
		case <-b.reaped:
		case <-time.After(10 * time.Second):
			t.Errorf("QEMU pid %d does not die", b.cmd.Process.Pid)
		}
	}
	if b.vm != nil {
		b.vm.Close()
	}
}

// cleanupAndCheck removes the VM's run directory and checks that nothing
// of the VM is left.
func (b *bootedVM) cleanupAndCheck(t *testing.T) {
	t.Helper()
	b.client.Close()
	select {
	case <-b.reaped:
	case <-time.After(30 * time.Second):
		t.Fatal("QEMU was not reaped")
	}
	if err := b.vm.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(b.st.RunDir); !os.IsNotExist(err) {
		t.Errorf("run directory %s left: %v", b.st.RunDir, err)
	}
	if ps := processesMentioning(b.st.RunDir); len(ps) > 0 {
		t.Errorf("processes of the VM left: %v", ps)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(b.st.Pid)); err == nil && strings.Contains(cmdline(b.st.Pid), b.st.RunDir) {
		t.Errorf("QEMU pid %d still there", b.st.Pid)
	}
}

func checkAgent(ctx context.Context, t *testing.T, b *bootedVM) {
	h, err := b.agent.Hello(ctx, &agentapi.HelloRequest{Version: agentapi.ProtocolVersion})
	if err != nil {
		t.Fatal(err)
	}
	img := guestImage(t)
	if h.Version != agentapi.ProtocolVersion || h.BootId == "" || h.KernelRelease != img.KernelRelease || h.ImageKey != img.Key || h.AgentVersion == "" {
		t.Errorf("Hello: %v", h)
	}
	c, err := b.agent.Check(ctx, &agentapi.CheckRequest{Runtime: true})
	if err != nil {
		t.Fatalf("Check (runc in the guest): %v%s", err, b.logs())
	}
	if !strings.Contains(c.RuntimeVersion, "runc version") || c.MemTotalBytes == 0 || c.UptimeNs == 0 {
		t.Errorf("Check: %v", c)
	}
	t.Logf("guest: %s, %d MiB usable, %s", strings.SplitN(c.RuntimeVersion, "\n", 2)[0], c.MemTotalBytes>>20, h.KernelRelease)

	// The clock: set it an hour ahead, see it there, set it back.
	ahead := time.Now().Add(time.Hour)
	if _, err := b.agent.SyncClock(ctx, &agentapi.SyncClockRequest{HostTime: timestamppb.New(ahead)}); err != nil {
		t.Fatal(err)
	}
	c, err = b.agent.Check(ctx, &agentapi.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if off := c.Now.AsTime().Sub(time.Now()); off < 50*time.Minute {
		t.Errorf("guest clock %v after setting it an hour ahead (offset %v)", c.Now.AsTime(), off)
	}
	sent := time.Now()
	resp, err := b.agent.SyncClock(ctx, &agentapi.SyncClockRequest{HostTime: timestamppb.New(sent)})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GuestTime.AsTime(); got.Before(ahead) {
		t.Errorf("SyncClock's guest time before setting %v, want after %v", got, ahead)
	}
	c, err = b.agent.Check(ctx, &agentapi.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if off := c.Now.AsTime().Sub(time.Now()); off > time.Minute || off < -time.Minute {
		t.Errorf("guest clock off by %v after SyncClock", off)
	}
}

// checkReconnect cuts the host side of the channel in the middle of a
// frame (as a daemon that dies while sending), waits while the guest polls
// a closed port, and starts a new session.
func checkReconnect(ctx context.Context, t *testing.T, b *bootedVM) {
	b.client.Close() // the boot's session ends cleanly
	raw, err := net.Dial("unix", b.st.ChannelSocket)
	if err != nil {
		t.Fatal(err)
	}
	cut := &cutConn{Conn: raw}
	conn, err := channel.Client(ctx, cut)
	if err != nil {
		t.Fatalf("session over a fresh connection: %v", err)
	}
	b.connect(conn)
	if _, err := b.agent.Hello(ctx, &agentapi.HelloRequest{}); err != nil {
		t.Fatal(err)
	}
	cut.arm(30) // a header and a few bytes of the next frame, then hang up
	if _, err := b.agent.Check(ctx, &agentapi.CheckRequest{}); err == nil {
		t.Fatal("a call over a cut connection succeeded")
	}
	time.Sleep(300 * time.Millisecond) // the guest sees the host gone and polls
	start := time.Now()
	conn2, err := b.vm.DialAgent(ctx)
	if err != nil {
		t.Fatalf("reconnecting after the cut: %v%s", err, b.logs())
	}
	b.connect(conn2)
	if _, err := b.agent.Hello(ctx, &agentapi.HelloRequest{}); err != nil {
		t.Fatalf("Hello on the new session: %v", err)
	}
	if _, err := b.agent.Check(ctx, &agentapi.CheckRequest{}); err != nil {
		t.Fatalf("Check on the new session: %v", err)
	}
	t.Logf("reconnected after a cut frame in %v", time.Since(start))
}

// checkReattach does what a restarted daemon does: it drops its handle on
// the VM, attaches again from the JSON record alone, and reaches the agent.
func checkReattach(ctx context.Context, t *testing.T, b *bootedVM) {
	rec, err := json.Marshal(b.vm.State())
	if err != nil {
		t.Fatal(err)
	}
	b.client.Close()
	b.vm.Close()
	var st hypervisor.State
	if err := json.Unmarshal(rec, &st); err != nil {
		t.Fatal(err)
	}
	vm, err := qemu.Attach(ctx, st)
	if err != nil {
		t.Fatalf("attaching again from %s: %v", rec, err)
	}
	b.vm = vm
	if s, err := vm.QMP().QueryStatus(ctx); err != nil || !s.Running {
		t.Fatalf("status after attaching again: %+v %v", s, err)
	}
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b.connect(conn)
	if _, err := b.agent.Hello(ctx, &agentapi.HelloRequest{}); err != nil {
		t.Fatalf("Hello after attaching again: %v", err)
	}
	t.Logf("attached again from a %d-byte record", len(rec))
}

// cutConn passes writes through until armed, then lets n bytes of the
// next write through and closes the connection.
type cutConn struct {
	net.Conn
	mu sync.Mutex
	n  int
}

func (c *cutConn) arm(n int) {
	c.mu.Lock()
	c.n = n
	c.mu.Unlock()
}

func (c *cutConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	n := c.n
	c.mu.Unlock()
	if n > 0 && len(p) > n {
		c.Conn.Write(p[:n])
		c.Conn.Close()
		return n, io.ErrClosedPipe
	}
	return c.Conn.Write(p)
}

// waitModulesThenPSS waits for the late modules, lets the guest settle,
// and returns QEMU's PSS in KiB.
func waitModulesThenPSS(ctx context.Context, t *testing.T, b *bootedVM) int {
	for {
		c, err := b.agent.Check(ctx, &agentapi.CheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if c.ModulesReady {
			if len(c.ModuleErrors) > 0 {
				t.Errorf("modules failed in the guest: %v", c.ModuleErrors)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the guest's modules never finished loading")
		case <-time.After(100 * time.Millisecond):
		}
	}
	time.Sleep(time.Second)
	return pssKiB(t, b.st.Pid)
}

func pssKiB(t *testing.T, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "Pss:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatal("no Pss in smaps_rollup")
	return 0
}

// guestImage opens the image `make guest` published.
func guestImage(t *testing.T) *guest.Image {
	t.Helper()
	dir := os.Getenv("KUASAR_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(binDir, "..", "share", "kuasar", "guest")
	}
	img, err := guest.Open(dir)
	if err != nil {
		t.Fatalf("%v: build the guest image with `make guest` (make e2e does)", err)
	}
	return img
}

func p50(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2].Round(time.Millisecond)
}
