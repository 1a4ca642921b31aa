//go:build e2e || bench || conformance || pkg || kube

package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/contrib/scratch"
	"github.com/kuasar-io/containerd-kuasar/integration/images"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// Handlers under test.
const (
	kuasarRunc = "kuasar-runc"
	stockRunc  = "runc"
	kuasarVMM  = "kuasar-vmm"
)

var (
	binDir      string // containerd-kuasar, shim, keeper, crictl
	stockBinDir string // stock containerd and containerd-shim-runc-v2
	registry    = "127.0.0.1:5000"
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	binDir = os.Getenv("KUASAR_BIN_DIR")
	stockBinDir = os.Getenv("KUASAR_STOCK_BIN_DIR")
	if binDir == "" {
		fmt.Fprintln(os.Stderr, "KUASAR_BIN_DIR is not set: run the end-to-end tests with `make e2e`")
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "the end-to-end tests need root")
		return 2
	}
	cache := os.Getenv("KUASAR_CACHE_DIR")
	if cache == "" {
		cache = filepath.Join(os.TempDir(), "kuasar-e2e-cache")
	}
	images.CacheDir = filepath.Join(cache, "images")
	if err := sharedNetnsDir(); err != nil {
		fmt.Fprintln(os.Stderr, "preparing /run/netns:", err)
		return 2
	}
	ctx := context.Background()
	reg, err := images.StartRegistry(ctx, registry, filepath.Join(cache, "registry"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "local registry:", err)
		return 2
	}
	defer reg.Stop()
	if err := images.PushAll(ctx, registry); err != nil {
		fmt.Fprintln(os.Stderr, "test images:", err)
		return 2
	}
	return m.Run()
}

// Daemon is a containerd(-kuasar) under test, in its own root.
type Daemon struct {
	t      *testing.T
	Dir    string
	Binary string
	Config string
	Addr   string
	Bridge string
	Subnet string // the pod network (CNI host-local range)
	// CgroupParent is where this daemon's pods put their cgroups.
	CgroupParent string
	// TemplateDir holds kuasar-vmm's template RAM files.
	TemplateDir string
	RS          runtimeapi.RuntimeServiceClient
	IS          runtimeapi.ImageServiceClient

	cmd       *exec.Cmd
	exited    chan error
	conn      *grpc.ClientConn
	netnsSeen map[string]bool
	keeperPid int
	wasmHost  int    // pid of the node's Wasm host, once seen
	path      string // PATH of the daemon ("" for the build's)
	// ownMounts are mounts under Dir that are not the pods' (a kubelet's
	// root directory, which it makes a shared mount of itself): the leak
	// check passes over them.
	ownMounts map[string]bool
	// ownProcs are processes started from Dir that are not the pods' (a
	// test's kubelet, API server and etcd), passed over by the leak check
	// while they run.
	ownProcs map[int]bool
}

type daemonOptions struct {
	stock          bool   // stock containerd instead of containerd-kuasar
	extraConfig    string // appended to config.toml
	vmmConfig      string // lines of the kuasar-vmm controller's section
	defaultHandler string
	portMap        bool // the portmap CNI plugin (host ports)
	bigSubnet      bool // a /16 pod network (for more than 250 pods)
	// An installed tree in place of the build's binaries (the package
	// test): the daemon, the PATH it runs with, and a hook that may
	// rewrite d.Config before the daemon first starts.
	binary    string
	path      string
	configure func(t *testing.T, d *Daemon)
	// stockGVisor gives a stock daemon a runsc handler (gVisor's shim).
	stockGVisor bool
}

// subnet is a random pod network: a /24, or a /16.
func subnet(big bool, b []byte) string {
	if big {
		return fmt.Sprintf("10.%d.0.0/16", 100+int(b[0])%100)
	}
	return fmt.Sprintf("10.%d.%d.0/24", 100+int(b[0])%100, b[1])
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// startDaemon starts a daemon in a fresh root; cleanup stops it and checks
// that nothing leaked.
func startDaemon(t *testing.T, o daemonOptions) *Daemon {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "ke2e-")
	if err != nil {
		t.Fatal(err)
	}
	id := randHex(3)
	b := make([]byte, 2)
	rand.Read(b)
	d := &Daemon{
		t:            t,
		Dir:          dir,
		Bridge:       "ke" + id,
		CgroupParent: "/kuasar-e2e/" + id,
		Binary:       filepath.Join(binDir, "containerd-kuasar"),
		netnsSeen:    listNetns(),
	}
	if o.stock {
		d.Binary = filepath.Join(stockBinDir, "containerd")
	}
	if o.binary != "" {
		d.Binary, d.path = o.binary, o.path
	}
	d.Subnet = subnet(o.bigSubnet, b)
	layout, err := scratch.Write(scratch.Options{
		Dir:            dir,
		Bridge:         d.Bridge,
		Subnet:         d.Subnet,
		Mirror:         registry,
		DefaultHandler: o.defaultHandler,
		PortMap:        o.portMap,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.Config, d.Addr = layout.Config, layout.Address
	// kuasar-vmm keeps its templates' RAM in a tmpfs directory of this
	// daemon's, removed at cleanup.
	d.TemplateDir = filepath.Join("/dev/shm", filepath.Base(dir))
	// KUASAR_VMM_TEMPLATE runs the VM tests that do not choose on either
	// start path ("auto": clones of a template, the default; "off": every
	// pod VM boots).
	if tmpl := os.Getenv("KUASAR_VMM_TEMPLATE"); tmpl != "" && !strings.Contains(o.vmmConfig, "template =") {
		o.vmmConfig += fmt.Sprintf("\n  template = %q", tmpl)
	}
	o.extraConfig = fmt.Sprintf("\n[plugins.'io.containerd.sandbox.controller.v1.kuasar-vmm']\n  template_dir = %q\n%s\n", d.TemplateDir, o.vmmConfig) + o.extraConfig
	if o.extraConfig != "" {
		f, err := os.OpenFile(d.Config, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(f, o.extraConfig)
		f.Close()
	}
	if o.configure != nil {
		o.configure(t, d)
	}
	t.Cleanup(d.cleanup)
	if o.stockGVisor {
		if err := d.setupStockGVisor(); err != nil {
			t.Fatal(err)
		}
	}
	d.start()
	for _, img := range []string{images.Busybox, images.Pause} {
		d.pull(t, img)
	}
	return d
}

func (d *Daemon) env() []string {
	path := binDir + ":" + stockBinDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	if d.path != "" {
		path = d.path
	}
	return []string{"PATH=" + path, "HOME=/root", "TMPDIR=/tmp"}
}

func (d *Daemon) start() {
	t := d.t
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(d.Dir, "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	d.cmd = exec.Command(d.Binary, "--config", d.Config, "--log-level", "debug")
	d.cmd.Env = d.env()
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.exited = make(chan error, 1)
	go func(c *exec.Cmd, ch chan error) { ch <- c.Wait() }(d.cmd, d.exited)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		if _, err := os.Stat(d.Addr); err == nil {
			break
		}
		select {
		case err := <-d.exited:
			d.dumpLog()
			t.Fatalf("daemon exited at start: %v", err)
		case <-ctx.Done():
			d.dumpLog()
			t.Fatal("daemon socket did not appear")
		case <-time.After(20 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("unix://"+d.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	d.conn = conn
	d.RS = runtimeapi.NewRuntimeServiceClient(conn)
	d.IS = runtimeapi.NewImageServiceClient(conn)
	for {
		if _, err := d.RS.Version(ctx, &runtimeapi.VersionRequest{}); err == nil {
			if st, err := d.RS.Status(ctx, &runtimeapi.StatusRequest{}); err == nil && st.Status != nil {
				break
			}
		}
		select {
		case <-ctx.Done():
			// containerd writes its goroutines' stacks to its log on
			// SIGUSR1: what it is stuck on.
			_ = d.cmd.Process.Signal(syscall.SIGUSR1)
			time.Sleep(time.Second)
			d.dumpLog()
			_ = os.Remove(fmt.Sprintf("/tmp/containerd.%d.stacks.log", d.cmd.Process.Pid))
			t.Fatal("CRI did not answer")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// kill ends the daemon with sig and waits for it.
func (d *Daemon) kill(sig syscall.Signal) {
	d.t.Helper()
	if d.cmd == nil {
		return
	}
	d.recordKeeper()
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
		d.t.Errorf("daemon did not exit on %v", sig)
	}
	if d.conn != nil {
		d.conn.Close()
	}
	d.cmd = nil
}

// restart kills the daemon with sig and starts it again on the same root.
func (d *Daemon) restart(sig syscall.Signal) {
	d.t.Helper()
	d.kill(sig)
	d.start()
}

// recordKeeper remembers the keeper's pid, to end it at cleanup.
func (d *Daemon) recordKeeper() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := keeper.Dial(ctx, d.keeperSocket()); err == nil {
		d.keeperPid = c.KeeperPid
		c.Close()
	}
	if h, err := d.wasmHostClient().Connect(ctx); err == nil && h.GetPid() != 0 {
		d.wasmHost = int(h.GetPid())
	}
}

// wasmHostClient reaches the daemon's Wasm host, without starting one.
func (d *Daemon) wasmHostClient() *wasmhost.Client {
	return wasmhost.NewClient(wasmhost.Launch{
		Socket: filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-wasm", "host.sock"),
	})
}

func (d *Daemon) dumpLog() {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	lines := strings.Split(string(b), "\n")
	if len(lines) > 80 {
		lines = lines[len(lines)-80:]
	}
	d.t.Logf("daemon log (tail):\n%s", strings.Join(lines, "\n"))
	if b, err := os.ReadFile(filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-wasm", "host.log")); err == nil {
		d.t.Logf("wasm host log:\n%s", b)
	}
}

// cleanup removes every pod, stops the daemon and checks for leaks.
func (d *Daemon) cleanup() {
	t := d.t
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if d.cmd != nil {
		d.removeAllPods(ctx)
		d.kill(syscall.SIGTERM)
	}
	d.checkLeaks()
	for _, pid := range []int{d.keeperPid, d.wasmHost} {
		if pid != 0 {
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	}
	_ = exec.Command("ip", "link", "del", d.Bridge).Run()
	if t.Failed() {
		d.dumpLog()
	}
	// A daemon that died (or leaked) leaves its pods' processes running:
	// they are this test's (in its cgroups, or named after its root), and
	// go before their mounts and cgroups do, whether the test failed or not.
	killLeftovers(d.CgroupParent, d.Dir, d.ownProcs)
	forceUnmountUnder(d.Dir)
	removeCgroups(d.CgroupParent)
	os.RemoveAll(d.TemplateDir)
	if !t.Failed() {
		os.RemoveAll(d.Dir)
	} else {
		t.Logf("kept %s for inspection", d.Dir)
	}
}

func (d *Daemon) removeAllPods(ctx context.Context) {
	pods, err := d.RS.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		d.t.Errorf("listing pods at cleanup: %v", err)
		return
	}
	for _, p := range pods.Items {
		if _, err := d.RS.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			d.t.Errorf("stopping pod %s at cleanup: %v", p.Id, err)
		}
		if _, err := d.RS.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			d.t.Errorf("removing pod %s at cleanup: %v", p.Id, err)
		}
	}
}

// checkLeaks reports anything of the daemon's pods left on the machine.
func (d *Daemon) checkLeaks() {
	t := d.t
	t.Helper()
	if d.keeperPid != 0 {
		if kids := childrenOf(d.keeperPid); len(kids) > 0 {
			t.Errorf("leak: keeper %d still has children %v", d.keeperPid, kids)
		}
	}
	if d.wasmHost != 0 {
		c := d.wasmHostClient()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if st, err := c.HostStats(ctx); err == nil && st.GetContainers()+st.GetPods() > 0 {
			t.Errorf("leak: the wasm host still holds %d containers of %d pods", st.GetContainers(), st.GetPods())
		}
		cancel()
		c.Close()
	}
	daemon := 0
	if d.cmd != nil && d.cmd.Process != nil {
		daemon = d.cmd.Process.Pid // checked while running, between rounds
	}
	for _, p := range processesMentioning(d.Dir) {
		if p != d.keeperPid && p != d.wasmHost && p != daemon && !d.ownProcs[p] {
			t.Errorf("leak: process %d still runs from %s: %s", p, d.Dir, cmdline(p))
		}
	}
	for _, m := range mountsUnder(d.Dir) {
		if !d.ownMounts[m] && !isRunscNullNetns(m) {
			t.Errorf("leak: mount %s", m)
		}
	}
	// Other daemons on the machine (tests run side by side) make network
	// namespaces too: count those this daemon's log names.
	daemonLog, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	for ns := range listNetns() {
		if !d.netnsSeen[ns] && strings.Contains(string(daemonLog), ns) {
			t.Errorf("leak: network namespace %s", ns)
		}
	}
	for _, dir := range []string{
		filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-runc", "sandboxes"),
		filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-wasm", "sandboxes"),
		filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-vmm", "sandboxes"),
		filepath.Join(d.Dir, "state", "v"),
		filepath.Join(d.Dir, "state", "k"),
		filepath.Join(d.Dir, "root", "io.containerd.grpc.v1.cri", "sandboxes"),
		filepath.Join(d.Dir, "state", "io.containerd.grpc.v1.cri", "sandboxes"),
	} {
		if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			t.Errorf("leak: %s still holds %v", dir, names)
		}
	}
	for _, cg := range cgroupChildren(d.CgroupParent) {
		t.Errorf("leak: cgroup %s", cg)
	}
	// runc's own state: a container no record owns lives on there.
	if entries, err := os.ReadDir(filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-runc", "runc")); err == nil {
		for _, e := range entries {
			t.Errorf("leak: runc container %s", e.Name())
		}
	}
	d.checkGVisorLeaks()
	// Streams the keeper holds for processes that are gone.
	if keys := d.keeperIO(); len(keys) > 0 {
		t.Errorf("leak: the keeper still holds streams %v", keys)
	}
}

// keeperIO lists the streams the daemon's keeper holds (none without a
// keeper).
func (d *Daemon) keeperIO() []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := keeper.Dial(ctx, d.keeperSocket())
	if err != nil {
		return nil
	}
	defer c.Close()
	keys, _ := c.ListIO(ctx)
	return keys
}

func (d *Daemon) keeperSocket() string {
	return filepath.Join(d.Dir, "state", "io.containerd.kuasar.monitor.v1.keeper", fmt.Sprintf("keeper-v%d.sock", keeper.ProtocolVersion))
}

// sharedNetnsDir makes /run/netns a shared mount of its own, as iproute2's
// `ip netns add` does the first time it runs, before any daemon pins a
// network namespace there. Done later, by a test or another tool on the
// machine, it would hide the namespaces already mounted on the directory
// beneath it, and their removal would fail with EBUSY.
func sharedNetnsDir() error {
	const dir = "/run/netns"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, "")
		}
	}
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return err
	}
	return syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, "")
}

func listNetns() map[string]bool {
	out := map[string]bool{}
	entries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		out[e.Name()] = true
	}
	return out
}

func childrenOf(pid int) []int {
	var kids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) && f[0] != "Z" {
			kids = append(kids, p)
		}
	}
	return kids
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}

// processesMentioning lists live processes whose command line mentions s.
func processesMentioning(s string) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == os.Getpid() {
			continue
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); err == nil && strings.Contains(string(st), ") Z ") {
			continue
		}
		if strings.Contains(cmdline(p), s) {
			out = append(out, p)
		}
	}
	return out
}

func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			out = append(out, fields[4])
		}
	}
	return out
}

func forceUnmountUnder(dir string) {
	ms := mountsUnder(dir)
	for i := len(ms) - 1; i >= 0; i-- {
		_ = syscall.Unmount(ms[i], syscall.MNT_DETACH)
	}
}

// cgroupRoots are the hierarchies a cgroup path lives in.
func cgroupRoots() []string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}
	}
	var roots []string
	// On a hybrid host runc also creates the cgroup in the cgroup2 tree
	// mounted at "unified".
	for _, c := range []string{"cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "hugetlb", "systemd", "net_cls", "perf_event", "unified"} {
		if st, err := os.Stat("/sys/fs/cgroup/" + c); err == nil && st.IsDir() {
			roots = append(roots, "/sys/fs/cgroup/"+c)
		}
	}
	return roots
}

// cgroupChildren lists cgroups below parent that still hold processes.
func cgroupChildren(parent string) []string {
	var out []string
	for _, root := range cgroupRoots() {
		base := filepath.Join(root, parent)
		_ = filepath.WalkDir(base, func(p string, e os.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			if b, err := os.ReadFile(filepath.Join(p, "cgroup.procs")); err == nil && len(strings.TrimSpace(string(b))) > 0 {
				out = append(out, p)
			}
			return nil
		})
	}
	return out
}

// removeCgroups removes the (empty) cgroup tree of parent.
// killLeftovers SIGKILLs the processes in the cgroups under parent and
// those whose command line names dir (a VM's QEMU, gVisor's sentry and
// gofers), and waits briefly for them to go.
func killLeftovers(parent, dir string, spare map[int]bool) {
	pids := map[int]bool{}
	for _, root := range cgroupRoots() {
		_ = filepath.WalkDir(filepath.Join(root, parent), func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	if dir != "" {
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			if b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil && bytes.Contains(b, []byte(dir+"/")) {
				pids[pid] = true
			}
		}
	}
	for pid := range spare {
		delete(pids, pid)
	}
	for pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		alive := 0
		for pid := range pids {
			if syscall.Kill(pid, 0) == nil {
				if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !bytes.Contains(st, []byte(") Z ")) {
					alive++
				}
			}
		}
		if alive == 0 {
			return
		}
	}
}

func removeCgroups(parent string) {
	for _, root := range cgroupRoots() {
		base := filepath.Join(root, parent)
		var dirs []string
		_ = filepath.WalkDir(base, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.Remove(dirs[i])
		}
		_ = os.Remove(filepath.Dir(base)) // /kuasar-e2e, if now empty
	}
}

// waitPort waits for a TCP port to accept connections.
func waitPort(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitHTTP fetches url until its body contains want.
func waitHTTP(url, want string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(body), want) {
				return nil
			}
			err = fmt.Errorf("%s: body %q", resp.Status, body)
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// envInt reads a positive integer setting from the environment.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
