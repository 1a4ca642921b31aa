//go:build e2e

package integration

import (
	"crypto/md5"
	"encoding/json"
	"fmt"
	"math/rand/v2"
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

	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// hypervisorKVMUsable says why KVM cannot be used on this node (nil: it
// can), as kuasar-gvisor decides it.
func hypervisorKVMUsable() error { return hypervisor.KVMUsable() }

// gvisorPodState is what kuasar-gvisor records of a pod (its sandbox
// record's state).
type gvisorPodState struct {
	SentryPid int    `json:"sentryPid"`
	Cgroup    string `json:"cgroup"`
}

func gvisorPod(t *testing.T, d *Daemon, pod string) gvisorPodState {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-appkernel", "sandboxes", pod, "sandbox.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Sandbox struct {
			State gvisorPodState `json:"state"`
		} `json:"sandbox"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	return rec.Sandbox.State
}

// sentryOf is the sentry of a kuasar-gvisor pod.
func sentryOf(t *testing.T, d *Daemon, pod string) int {
	t.Helper()
	st := gvisorPod(t, d, pod)
	if st.SentryPid == 0 {
		t.Fatalf("pod %s records no sentry", short(pod))
	}
	return st.SentryPid
}

// podIP is the pod's address as CRI reports it.
func podIP(t *testing.T, d *Daemon, pod string) string {
	t.Helper()
	r, err := d.RS.PodSandboxStatus(ctx(t), &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.GetNetwork().GetIp()
}

// TestGVisorPod runs a kuasar-gvisor pod through its life: the pod's files
// and address in its containers, logs, exec with and without a terminal,
// attach, stop with the container's exit code, and removal. The node runs
// gVisor's own processes for it and nothing else: no shim, no pause, no
// runsc command left running, and the sentry is the keeper's child.
func TestGVisorPod(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvisor")
	podCfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
	pod := d.runPod(t, kuasarGVisor, podCfg)
	c := d.run(t, pod, podCfg, ctrConfig("main", "sh", "-c", "echo out-line; echo err-line >&2; exec sleep 3600"))
	d.waitLog(t, c, "out-line", 20*time.Second)
	d.waitLog(t, c, "err-line", 20*time.Second)
	// stdout and stderr are two pipes: CRI keeps the order within a
	// stream, not across them.
	var streams []string
	for _, l := range readLog(t, d.logPath(t, c)) {
		streams = append(streams, l.Stream+":"+l.Text)
	}
	sort.Strings(streams)
	if strings.Join(streams, ",") != "stderr:err-line,stdout:out-line" {
		t.Errorf("log %v", streams)
	}

	ip := podIP(t, d, pod)
	for _, tc := range []struct {
		cmd  []string
		want string
	}{
		{[]string{"cat", "/etc/hostname"}, podCfg.Hostname + "\n"},
		{[]string{"hostname"}, podCfg.Hostname + "\n"},
		{[]string{"grep", "-c", "nameserver 10.96.0.10", "/etc/resolv.conf"}, "1\n"},
		{[]string{"grep", "-c", "search e2e.svc.cluster.local", "/etc/resolv.conf"}, "1\n"},
		{[]string{"sh", "-c", "grep -q localhost /etc/hosts && echo ok"}, "ok\n"},
		{[]string{"sh", "-c", "ip -o -4 addr show eth0 | grep -c ' " + ip + "/'"}, "1\n"},
		// The application kernel's own dmesg says it is gVisor.
		{[]string{"sh", "-c", "dmesg | grep -c -i gvisor"}, ""},
	} {
		out, stderr, code := d.execSync(t, c, tc.cmd...)
		if tc.want == "" {
			if code != 0 || out == "0\n" {
				t.Errorf("%v = %q %q (exit %d)", tc.cmd, out, stderr, code)
			}
			continue
		}
		if code != 0 || out != tc.want {
			t.Errorf("%v = %q %q (exit %d), want %q", tc.cmd, out, stderr, code, tc.want)
		}
	}
	if out, stderr, code := d.execSync(t, c, "sh", "-c", "echo o; echo e >&2; exit 3"); out != "o\n" || stderr != "e\n" || code != 3 {
		t.Errorf("exec: %q %q %d", out, stderr, code)
	}
	cmd := d.crictl("exec", "-i", c, "sh", "-c", "read x; echo got-$x")
	cmd.Stdin = strings.NewReader("hello\n")
	if b, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(b), "got-hello") {
		t.Errorf("exec -i: %q %v", b, err)
	}
	out := ptyRun(t, d.crictl("exec", "-it", c, "sh"), "test -t 0 && echo term-$((6*7)); exit 5\n", 30*time.Second)
	if !strings.Contains(out, "term-42") {
		t.Errorf("exec -it:\n%s", out)
	}

	// What runs on the node for the pod: gVisor's processes only.
	sentry := sentryOf(t, d, pod)
	parent, _ := readProc(mustProc(t, sentry).PPid)
	if parent.Comm != "kuasar-keeper" {
		t.Errorf("the sentry's parent is %+v, want the keeper", parent)
	}
	for _, p := range allProcs() {
		if argv0 := strings.Fields(p.Cmdline + " x")[0]; filepath.Base(argv0) == "runsc" {
			t.Errorf("a runsc command is still running: %s", p.Cmdline)
		}
	}
	keeper := d.keeperPidNow(t)
	for _, p := range allProcs() {
		if p.PPid == keeper && !strings.HasPrefix(p.Cmdline, "runsc-sandbox") && !strings.HasPrefix(p.Cmdline, "runsc-gofer") {
			t.Errorf("the keeper parents something that is not gVisor's: %+v", p)
		}
	}
	if shims := shimsOf(d); len(shims) != 0 {
		t.Errorf("shims serve the daemon: %+v", shims)
	}
	var names []string
	for _, p := range gvisorProcs(d) {
		names = append(names, strings.Fields(p.Cmdline + " ?")[0])
	}
	t.Logf("gVisor processes of the pod: %v", names)

	// Stop: SIGTERM reaches the container in the sandbox.
	if _, err := d.RS.StopContainer(ctx(t), &runtimeapi.StopContainerRequest{ContainerId: c, Timeout: 10}); err != nil {
		t.Fatal(err)
	}
	if st := d.status(t, c); st.ExitCode != 143 || st.State != runtimeapi.ContainerState_CONTAINER_EXITED {
		t.Errorf("after stop: %v exit %d", st.State, st.ExitCode)
	}
	d.stopRemove(t, c, 2)
	d.removePod(t, pod)
	if ps := gvisorProcs(d); len(ps) != 0 {
		t.Errorf("gVisor processes left after the pod's removal: %+v", ps)
	}
}

func mustProc(t *testing.T, pid int) proc {
	t.Helper()
	p, ok := readProc(pid)
	if !ok {
		t.Fatalf("process %d is gone", pid)
	}
	return p
}

// keeperPidNow is the pid of the daemon's keeper.
func (d *Daemon) keeperPidNow(t *testing.T) int {
	t.Helper()
	d.recordKeeper()
	if d.keeperPid == 0 {
		t.Fatal("no keeper")
	}
	return d.keeperPid
}

// TestGVisorAttach: a container started with stdin and a terminal takes
// input through `crictl attach`, and its exit code is reported.
func TestGVisorAttach(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvattach")
	pod := d.runPod(t, kuasarGVisor, podCfg)
	cfg := ctrConfig("shell", "sh", "-c", `while read -r line; do eval "$line"; done`)
	cfg.Stdin, cfg.Tty = true, true
	c := d.run(t, pod, podCfg, cfg)
	d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_RUNNING, 10*time.Second)
	out := ptyRun(t, d.crictl("attach", "-it", c), "test -t 0 && echo attached-$((2+3))\nexit 4\n", 30*time.Second)
	d.waitLog(t, c, "attached-5", 10*time.Second)
	if st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 4 {
		t.Fatalf("exit %d, want 4 (attach showed %q)", st.ExitCode, out)
	}
	// Without a terminal: stdin open, closed by the client.
	cfg = ctrConfig("cat", "sh", "-c", "while read -r l; do echo got-$l; done; echo eof; exit 6")
	cfg.Stdin, cfg.StdinOnce = true, true
	c2 := d.run(t, pod, podCfg, cfg)
	d.waitState(t, c2, runtimeapi.ContainerState_CONTAINER_RUNNING, 10*time.Second)
	att := d.crictl("attach", "-i", c2)
	att.Stdin = strings.NewReader("one\n")
	_ = att.Run()
	d.waitLog(t, c2, "got-one", 10*time.Second)
	if st := d.waitState(t, c2, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 6 {
		t.Fatalf("stdin-once container exit %d, want 6", st.ExitCode)
	}
	d.removePod(t, pod)
}

// ctrTask runs stock ctr against the daemon's containerd API.
func (d *Daemon) ctr(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(stockBinDir, "ctr"), append([]string{"-a", d.Addr, "-n", "k8s.io"}, args...)...)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ctr %v: %v\n%s", args, err, b)
	}
	return string(b)
}

// TestGVisorTaskOps: pids (with execs marked), kill of one process and of
// all of them, stats per container from the sandbox's own accounting,
// update.
func TestGVisorTaskOps(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvtask")
	pod := d.runPod(t, kuasarGVisor, podCfg)
	busy := d.run(t, pod, podCfg, ctrConfig("busy", "sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=48; while true; do :; done"))
	idle := d.run(t, pod, podCfg, ctrConfig("idle", "sh", "-c", "sleep 3600 & sleep 3600 & wait"))

	// Pids: the sandbox's numbering, an exec among them.
	exec := d.crictl("exec", idle, "sleep", "30")
	if err := exec.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { exec.Process.Kill(); exec.Wait() }()
	var ps string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		ps = d.ctr(t, "task", "ps", idle)
		if strings.Count(ps, "\n") >= 5 && strings.Contains(ps, "INFO") && strings.Count(ps, "exec_id") >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ctr task ps: want the init, 2 sleeps and the exec:\n%s", ps)
		}
	}

	// Stats: the busy container's CPU and memory are its own.
	time.Sleep(2 * time.Second)
	stats := func(id string) (cpu, mem uint64) {
		r, err := d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: id})
		if err != nil {
			t.Fatal(err)
		}
		return r.Stats.GetCpu().GetUsageCoreNanoSeconds().GetValue(), r.Stats.GetMemory().GetWorkingSetBytes().GetValue()
	}
	bCPU, bMem := stats(busy)
	iCPU, iMem := stats(idle)
	t.Logf("busy: cpu %d ns, memory %d B; idle: cpu %d ns, memory %d B", bCPU, bMem, iCPU, iMem)
	if bCPU <= iCPU || bMem <= iMem || bMem < 48<<20 || iMem == 0 {
		t.Errorf("per-container stats do not tell the containers apart: busy %d/%d idle %d/%d", bCPU, bMem, iCPU, iMem)
	}
	if out := d.crictlOut(t, "stats", "-o", "json", busy); !strings.Contains(out, busy) {
		t.Errorf("crictl stats: %s", out)
	}

	// Kill one process of the container (an exec), then all of them.
	d.ctr(t, "task", "kill", "-a", "-s", "SIGKILL", busy)
	if st := d.waitState(t, busy, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 137 {
		t.Errorf("killed container exit %d", st.ExitCode)
	}
	d.ctr(t, "task", "kill", "-s", "SIGTERM", idle)
	if st := d.waitState(t, idle, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 143 {
		t.Errorf("terminated container exit %d", st.ExitCode)
	}
	d.removePod(t, pod)
}

// sandboxCgroupOf is the host cgroup of a kuasar-gvisor pod's sandbox.
func sandboxCgroupOf(t *testing.T, d *Daemon, pod string) string {
	t.Helper()
	return gvisorPod(t, d, pod).Cgroup
}

// TestGVisorLimits: the sandbox's processes are in the pod's cgroup; the
// limits of its containers add up to the sandbox's (plus gVisor's own
// memory), follow updates, and a container that goes past its memory is
// reported OOMKilled.
func TestGVisorLimits(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvlimits")
	pod := d.runPod(t, kuasarGVisor, podCfg)
	limited := func(name string, memMiB int64, quota int64, cmd ...string) *runtimeapi.ContainerConfig {
		cfg := ctrConfig(name, cmd...)
		cfg.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: memMiB << 20, CpuPeriod: 100000, CpuQuota: quota, CpuShares: 512}
		return cfg
	}
	a := d.run(t, pod, podCfg, limited("a", 64, 50000, "sleep", "3600"))
	b := d.run(t, pod, podCfg, limited("b", 32, 20000, "sleep", "3600"))
	cg := sandboxCgroupOf(t, d, pod)
	if !strings.HasPrefix(cg, podCfg.Linux.CgroupParent+"/") {
		t.Fatalf("sandbox cgroup %s is not in the pod's %s", cg, podCfg.Linux.CgroupParent)
	}
	sentry := sentryOf(t, d, pod)
	procs := readCgroupProcs(t, cg)
	if !procs[sentry] {
		t.Fatalf("the sentry %d is not in the sandbox's cgroup %s (%v)", sentry, cg, procs)
	}
	for _, p := range gvisorProcs(d) {
		if !procs[p.Pid] {
			t.Errorf("gVisor process %d (%s) is not in the pod's cgroup", p.Pid, p.Comm)
		}
	}
	overhead := int64(64 << 20)
	expectCgroup(t, cg, "memory", "memory.limit_in_bytes", strconv.FormatInt(96<<20+overhead, 10), "memory.max", strconv.FormatInt(96<<20+overhead, 10))
	expectCgroup(t, cg, "cpu", "cpu.cfs_quota_us", "70000", "cpu.max", "70000 100000")
	expectCgroup(t, cg, "cpu", "cpu.shares", "1024", "cpu.weight", "39")

	// An update changes the sum.
	if _, err := d.RS.UpdateContainerResources(ctx(t), &runtimeapi.UpdateContainerResourcesRequest{ContainerId: b,
		Linux: &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 128 << 20, CpuPeriod: 100000, CpuQuota: 100000, CpuShares: 512}}); err != nil {
		t.Fatal(err)
	}
	expectCgroup(t, cg, "memory", "memory.limit_in_bytes", strconv.FormatInt(192<<20+overhead, 10), "memory.max", strconv.FormatInt(192<<20+overhead, 10))
	expectCgroup(t, cg, "cpu", "cpu.cfs_quota_us", "150000", "cpu.max", "150000 100000")
	d.stopRemove(t, a, 2)
	d.stopRemove(t, b, 2)
	d.removePod(t, pod)

	// Past its memory: the sandbox is OOM-killed, the container reported
	// OOMKilled.
	podCfg = d.podConfig("gvoom")
	pod = d.runPod(t, kuasarGVisor, podCfg)
	hog := d.run(t, pod, podCfg, limited("hog", 32, 0, "sh", "-c", "echo start; head -c 400m /dev/zero | tail > /dev/null; echo survived"))
	st := d.waitState(t, hog, runtimeapi.ContainerState_CONTAINER_EXITED, 60*time.Second)
	if st.Reason != "OOMKilled" || st.ExitCode != 137 {
		t.Errorf("memory hog: reason %q exit %d, want OOMKilled 137", st.Reason, st.ExitCode)
	}
	for deadline := time.Now().Add(10 * time.Second); d.podState(t, pod) != runtimeapi.PodSandboxState_SANDBOX_NOTREADY; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the pod whose sandbox was OOM-killed is still ready")
		}
	}
	d.removePod(t, pod)
}

func readCgroupProcs(t *testing.T, cg string) map[int]bool {
	t.Helper()
	out := map[int]bool{}
	for _, root := range cgroupRoots() {
		if !strings.HasSuffix(root, "/memory") && root != "/sys/fs/cgroup" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(root, cg, "cgroup.procs"))
		if err != nil {
			t.Fatalf("reading the sandbox cgroup: %v", err)
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out[pid] = true
			}
		}
	}
	return out
}

// TestGVisorSharedPID: containers of a pod that shares its PID namespace
// see each other, with kuasar-gvisor's idle program as PID 1, which reaps
// orphans.
func TestGVisorSharedPID(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvpid")
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	pod := d.runPod(t, kuasarGVisor, podCfg)
	one := ctrConfig("one", "sleep", "3600")
	one.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	two := ctrConfig("two", "sh", "-c", "sleep 3600")
	two.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	c1 := d.run(t, pod, podCfg, one)
	d.run(t, pod, podCfg, two)
	// StartContainer returns once the second container's process exists;
	// it may still be loading sh (comm "exe") when ps first looks.
	var out string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var code int32
		out, _, code = d.execSync(t, c1, "ps", "-o", "pid,comm")
		if code == 0 && strings.Contains(out, "1 pause") && strings.Count(out, "sleep") >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ps in a shared PID namespace:\n%s", out)
		}
	}
	// An orphan: its parent exits, PID 1 must reap it.
	if _, _, code := d.execSync(t, c1, "sh", "-c", "sleep 0.3 &"); code != 0 {
		t.Fatal("starting an orphan")
	}
	time.Sleep(time.Second)
	out, _, _ = d.execSync(t, c1, "ps", "-o", "stat,comm")
	if strings.Contains(out, "Z ") {
		t.Errorf("a zombie is left in the shared PID namespace:\n%s", out)
	}
	d.removePod(t, pod)
}

// TestGVisorNetwork: pod-to-pod traffic between two kuasar-gvisor pods and
// with a kuasar-runc pod, and a pod on the host's network.
func TestGVisorNetwork(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	serve := func(handler, name string) (string, string) {
		cfg := d.podConfig(name)
		pod := d.runPod(t, handler, cfg)
		d.run(t, pod, cfg, ctrConfig("web", "sh", "-c", "mkdir -p /www; echo hello-"+name+" > /www/index.html; httpd -f -p 8080 -h /www"))
		return pod, podIP(t, d, pod)
	}
	gPod, gIP := serve(kuasarGVisor, "gvweb")
	rPod, rIP := serve(kuasarRunc, "rcweb")
	clientCfg := d.podConfig("gvclient")
	client := d.runPod(t, kuasarGVisor, clientCfg)
	cc := d.run(t, client, clientCfg, ctrConfig("client", "sleep", "3600"))
	for _, tc := range []struct{ ip, want string }{{gIP, "hello-gvweb"}, {rIP, "hello-rcweb"}} {
		var out string
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			// busybox's nc: its wget dies of SIGSEGV in gVisor (also on
			// the stock shim, same runsc).
			out, _, _ = d.execSync(t, cc, "sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 `+tc.ip+" 8080")
			if strings.Contains(out, tc.want) || time.Now().After(deadline) {
				break
			}
		}
		if !strings.Contains(out, tc.want) {
			t.Errorf("gVisor pod to %s: %q", tc.ip, out)
		}
	}
	// From the node, into a gVisor pod.
	if err := waitPort(gIP+":8080", 10*time.Second); err != nil {
		t.Errorf("node to gVisor pod: %v", err)
	}

	// A pod on the node's network sees the node's interfaces.
	hostCfg := d.podConfig("gvhost")
	hostCfg.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
	hostPod := d.runPod(t, kuasarGVisor, hostCfg)
	hc := d.run(t, hostPod, hostCfg, ctrConfig("host", "sleep", "3600"))
	out, _, code := d.execSync(t, hc, "ip", "-o", "link")
	if code != 0 || !strings.Contains(out, d.Bridge) {
		t.Errorf("host-network gVisor pod does not see the node's bridge %s:\n%s", d.Bridge, out)
	}
	for _, p := range []string{gPod, rPod, client, hostPod} {
		d.removePod(t, p)
	}
}

// TestGVisorRestart restarts the daemon (SIGTERM, then SIGKILL) with a
// kuasar-gvisor pod running: afterwards it is listed and ready, logs
// continue on both kinds of stdio, a container that exited while the
// daemon was down reports its exit code, exec works, a new container gets
// the pod's files, and stop and remove work.
func TestGVisorRestart(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			cfg := d.podConfig("gvrestart")
			cfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
			pod := d.runPod(t, kuasarGVisor, cfg)
			ticker := d.run(t, pod, cfg, ctrConfig("ticker", "sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"))
			late := d.run(t, pod, cfg, ctrConfig("late", "sh", "-c", "echo started; sleep 3; echo leaving; exit 7"))
			ttyCfg := ctrConfig("tty", "sh", "-c", "while true; do test -t 1 && echo tty-yes; sleep 0.2; done")
			ttyCfg.Tty = true
			tty := d.run(t, pod, cfg, ttyCfg)
			d.waitLog(t, ticker, "tick-2", 20*time.Second)
			d.waitLog(t, late, "started", 10*time.Second)
			d.waitLog(t, tty, "tty-yes", 10*time.Second)
			sentry := sentryOf(t, d, pod)

			d.kill(sig)
			time.Sleep(4 * time.Second) // "late" exits while the daemon is down
			d.start()

			if st := d.podState(t, pod); st != runtimeapi.PodSandboxState_SANDBOX_READY {
				t.Fatalf("pod %v after restart", st)
			}
			if got := sentryOf(t, d, pod); got != sentry {
				t.Fatalf("sentry %d after restart, was %d", got, sentry)
			}
			for _, c := range []string{ticker, tty} {
				if st := d.status(t, c); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
					t.Fatalf("container %s %v after restart", short(c), st.State)
				}
			}
			if st := d.waitState(t, late, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second); st.ExitCode != 7 {
				t.Fatalf("container that exited during the restart reports %d, want 7", st.ExitCode)
			}
			for _, c := range []string{ticker, tty} {
				before := countLines(t, d, c)
				for deadline := time.Now().Add(10 * time.Second); countLines(t, d, c) < before+3; time.Sleep(100 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("log of %s stopped after restart", short(c))
					}
				}
			}
			if out, _, code := d.execSync(t, ticker, "echo", "alive"); code != 0 || out != "alive\n" {
				t.Fatalf("exec after restart: %q %d", out, code)
			}
			cfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
			after := d.run(t, pod, cfg, ctrConfig("after", "sleep", "3600"))
			for _, cmd := range [][]string{{"cat", "/etc/hostname"}, {"grep", "-c", "nameserver 10.96.0.10", "/etc/resolv.conf"}} {
				if out, _, code := d.execSync(t, after, cmd...); code != 0 || out == "" || out == "0\n" {
					t.Errorf("new container after restart: %v = %q (%d)", cmd, out, code)
				}
			}
			d.restart(syscall.SIGTERM)
			for _, c := range []string{ticker, late, tty, after} {
				d.stopRemove(t, c, 2)
			}
			d.removePod(t, pod)
		})
	}
}

// TestGVisorSandboxDies: the sentry killed from outside, with the daemon up
// and with it down: the pod turns NOTREADY, its containers exited, and the
// pod is removed with nothing left.
func TestGVisorSandboxDies(t *testing.T) {
	for _, down := range []bool{false, true} {
		t.Run(fmt.Sprintf("daemon-down=%v", down), func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			cfg := d.podConfig("gvdies")
			pod := d.runPod(t, kuasarGVisor, cfg)
			c := d.run(t, pod, cfg, ctrConfig("c", "sleep", "3600"))
			sentry := sentryOf(t, d, pod)
			if down {
				d.kill(syscall.SIGKILL)
			}
			if err := syscall.Kill(sentry, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			if down {
				time.Sleep(time.Second)
				d.start()
			}
			if st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 20*time.Second); st.ExitCode != 137 {
				t.Errorf("container of a killed sandbox: exit %d, want 137", st.ExitCode)
			}
			for deadline := time.Now().Add(10 * time.Second); d.podState(t, pod) != runtimeapi.PodSandboxState_SANDBOX_NOTREADY; time.Sleep(100 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("pod still ready after its sentry was killed")
				}
			}
			d.stopRemove(t, c, 2)
			d.removePod(t, pod)
		})
	}
}

// TestGVisorBadInput: what kuasar-gvisor cannot run fails with a clear CRI
// error and leaves nothing behind (the daemon's cleanup checks processes,
// mounts, network namespaces, cgroups, records and runsc's state).
func TestGVisorBadInput(t *testing.T) {
	t.Run("missing runsc", func(t *testing.T) {
		d := startDaemon(t, daemonOptions{extraConfig: "[plugins.'io.containerd.sandbox.controller.v1.kuasar-appkernel']\n  runsc_path = \"/nonexistent/runsc\"\n"})
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("norunsc"), RuntimeHandler: kuasarGVisor})
		expectErr(t, err, "/nonexistent/runsc")
		expectErr(t, err, "runsc_path")
		expectErr(t, err, "kuasar-appkernel")
	})
	t.Run("platform", func(t *testing.T) {
		d := startDaemon(t, daemonOptions{extraConfig: "[plugins.'io.containerd.sandbox.controller.v1.kuasar-appkernel']\n  platform = \"kvm\"\n"})
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("kvm"), RuntimeHandler: kuasarGVisor})
		if kvmErr := hypervisorKVMUsable(); kvmErr == nil {
			// A node with hardware virtualisation runs the pod on KVM.
			must(t, err, "a kvm pod on a node with KVM")
			t.Log("KVM is usable here: the pod ran on the kvm platform")
		} else {
			t.Logf("KVM is not usable here (%v): the pod must be refused", kvmErr)
			expectErr(t, err, "KVM")
			expectErr(t, err, "platform")
		}
	})
	t.Run("unknown platform", func(t *testing.T) {
		d := startDaemon(t, daemonOptions{extraConfig: "[plugins.'io.containerd.sandbox.controller.v1.kuasar-appkernel']\n  platform = \"warp\"\n"})
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("warp"), RuntimeHandler: kuasarGVisor})
		expectErr(t, err, "warp")
		expectCode(t, err, codes.InvalidArgument)
	})

	d := startDaemon(t, daemonOptions{})
	t.Run("pod user namespace", func(t *testing.T) {
		cfg := d.podConfig("userns")
		cfg.Linux.SecurityContext.NamespaceOptions.UsernsOptions = &runtimeapi.UserNamespace{Mode: runtimeapi.NamespaceMode_POD,
			Uids: []*runtimeapi.IDMapping{{HostId: 100000, ContainerId: 0, Length: 65536}}, Gids: []*runtimeapi.IDMapping{{HostId: 100000, ContainerId: 0, Length: 65536}}}
		_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: cfg, RuntimeHandler: kuasarGVisor})
		if err == nil {
			t.Fatal("a pod user namespace was accepted")
		}
		t.Logf("error as expected: %v", err)
	})
	podCfg := d.podConfig("gvbad")
	pod := d.runPod(t, kuasarGVisor, podCfg)
	t.Run("spec runsc refuses", func(t *testing.T) {
		// A bidirectional mount (rshared): gVisor has no shared mount
		// propagation. The host path is a shared mount, so that CRI
		// accepts it.
		cfg := ctrConfig("rshared", "true")
		cfg.Mounts = []*runtimeapi.Mount{{HostPath: "/run/netns", ContainerPath: "/mnt/ns", Propagation: runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL}}
		r, err := d.RS.CreateContainer(ctx(t), &runtimeapi.CreateContainerRequest{PodSandboxId: pod, Config: cfg, SandboxConfig: podCfg})
		if err == nil {
			_, err = d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: r.ContainerId})
			_, _ = d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: r.ContainerId})
		}
		expectErr(t, err, "rshared")
	})
	t.Run("missing command", func(t *testing.T) {
		id := d.create(t, pod, podCfg, ctrConfig("nocmd", "/no/such/command"))
		_, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: id})
		expectErr(t, err, "/no/such/command")
		if _, err := d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatalf("removing the failed container: %v", err)
		}
	})
	t.Run("exec of a missing command", func(t *testing.T) {
		c := d.run(t, pod, podCfg, ctrConfig("sleeper", "sleep", "3600"))
		_, err := d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: c, Cmd: []string{"/no/such/exec"}, Timeout: 10})
		if err == nil {
			t.Fatal("exec of a missing command succeeded")
		}
		expectErr(t, err, "/no/such/exec")
		d.stopRemove(t, c, 2)
	})
	t.Run("a container created but never started", func(t *testing.T) {
		d.create(t, pod, podCfg, ctrConfig("never", "sleep", "3600"))
	})
	// The pod goes with its containers, running, created or failed.
	d.run(t, pod, podCfg, ctrConfig("s2", "sh", "-c", "trap '' TERM; sleep 3600"))
	d.removePod(t, pod)
}

// TestGVisorKillDuringPodStarts kills the daemon (SIGKILL) at a random
// moment of a burst of concurrent kuasar-gvisor pod starts, several times.
// Once it is back, `crictl rmp -f -a` removes everything, and what a
// killed runsc create or start left without a record is reconciled away:
// no sentry or gofer, runsc state, mount, network namespace or cgroup may
// be left.
func TestGVisorKillDuringPodStarts(t *testing.T) {
	rounds := envInt("KUASAR_E2E_CRASH_ROUNDS", 5)
	d := startDaemon(t, daemonOptions{})
	for round := 0; round < rounds; round++ {
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				startPodUnchecked(d, kuasarGVisor, fmt.Sprintf("gvcrash-%d-%d", round, i), i)
			}()
		}
		delay := time.Duration(rand.IntN(1500)) * time.Millisecond
		time.Sleep(delay)
		d.kill(syscall.SIGKILL)
		wg.Wait()
		d.start()
		for _, args := range [][]string{{"rmp", "-f", "-a"}, {"rm", "-f", "-a"}} {
			if out, err := d.crictl(args...).CombinedOutput(); err != nil {
				t.Fatalf("round %d (killed after %v): crictl %v: %v\n%s", round, delay, args, err, out)
			}
		}
		d.recordKeeper()
		d.checkLeaks()
		if ps := gvisorProcs(d); len(ps) > 0 {
			t.Errorf("round %d: gVisor processes left: %+v", round, ps)
		}
		if t.Failed() {
			t.Fatalf("round %d: leaks after a kill %v into the burst", round, delay)
		}
		t.Logf("round %d: daemon killed %v into the burst, nothing left", round, delay)
	}
}

// TestGVisorBesideOtherKinds runs a pod of every kind on one daemon at
// once: kuasar-gvisor, kuasar-runc, kuasar-wasm and stock runc, each doing
// its work, then removes them all.
func TestGVisorBesideOtherKinds(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	d.pull(t, images.WasmLayer)
	type kind struct {
		handler string
		cfg     *runtimeapi.ContainerConfig
		want    string
	}
	kinds := []kind{
		{kuasarGVisor, ctrConfig("work", "sh", "-c", "echo hello-from-$(uname -s); dmesg | grep -q -i gvisor && echo in-gvisor; sleep 3600"), "in-gvisor"},
		{kuasarRunc, ctrConfig("work", "sh", "-c", "echo hello-runc; sleep 3600"), "hello-runc"},
		{kuasarWasm, wasmConfig("work", images.WasmLayer, "echo", "hello-wasm"), "hello-wasm"},
		{stockRunc, ctrConfig("work", "sh", "-c", "echo hello-stock; sleep 3600"), "hello-stock"},
	}
	var pods []string
	for _, k := range kinds {
		cfg := d.podConfig("beside-" + strings.ReplaceAll(k.handler, "-", ""))
		pod := d.runPod(t, k.handler, cfg)
		pods = append(pods, pod)
		c := d.run(t, pod, cfg, k.cfg)
		d.waitLog(t, c, k.want, 30*time.Second)
	}
	list, err := d.RS.ListPodSandbox(ctx(t), &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		t.Fatal(err)
	}
	handlers := map[string]bool{}
	for _, p := range list.Items {
		handlers[p.RuntimeHandler] = p.State == runtimeapi.PodSandboxState_SANDBOX_READY
	}
	for _, k := range kinds {
		if !handlers[k.handler] {
			t.Errorf("no ready %s pod listed: %v", k.handler, handlers)
		}
	}
	for _, p := range pods {
		d.removePod(t, p)
	}
}

// TestGVisorNoShimNoPause runs the same pod on kuasar-gvisor and on the
// stock baseline (stock containerd, gVisor's containerd-shim-runsc-v1, a
// pause image as the sandbox's root container), and compares what each
// puts on the node: the baseline a shim per container (the pause's
// included) besides gVisor's own processes, kuasar-gvisor nothing but
// gVisor's.
func TestGVisorNoShimNoPause(t *testing.T) {
	nodeProcs := func(d *Daemon) (shims, sentries, gofers int) {
		for _, p := range allProcs() {
			switch {
			case strings.HasPrefix(p.Comm, "containerd-shim") && strings.Contains(p.Cmdline, d.Addr):
				shims++
			case strings.HasPrefix(p.Cmdline, "runsc-sandbox") && strings.Contains(p.Cmdline, d.Dir):
				sentries++
			case strings.HasPrefix(p.Cmdline, "runsc-gofer") && strings.Contains(p.Cmdline, d.Dir):
				gofers++
			}
		}
		return
	}
	for _, tc := range []struct {
		name    string
		opts    daemonOptions
		handler string
		shims   int
	}{
		{"stock", daemonOptions{stock: true, stockGVisor: true}, stockGVisor, 3},
		{kuasarGVisor, daemonOptions{}, kuasarGVisor, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, tc.opts)
			cfg := d.podConfig("procs")
			pod := d.runPod(t, tc.handler, cfg)
			c1 := d.run(t, pod, cfg, ctrConfig("one", "sleep", "3600"))
			d.run(t, pod, cfg, ctrConfig("two", "sleep", "3600"))
			if out, _, code := d.execSync(t, c1, "sh", "-c", "dmesg | grep -c -i gvisor"); code != 0 || out == "0\n" {
				t.Fatalf("%s: the container is not in gVisor (%q)", tc.name, out)
			}
			shims, sentries, gofers := nodeProcs(d)
			t.Logf("%s: %d shim(s), %d sentry, %d gofers for a pod of 2 containers", tc.name, shims, sentries, gofers)
			if shims != tc.shims || sentries != 1 || gofers != 3 {
				t.Errorf("%s: %d shims, %d sentries, %d gofers; want %d, 1, 3", tc.name, shims, sentries, gofers, tc.shims)
			}
			d.removePod(t, pod)
		})
	}
}

// TestGVisorPortForward: CRI's port-forward reaches a server that listens
// on the pod's localhost only, in gVisor's network stack (CRI's own
// port-forward dials the node's side of the pod's network namespace,
// where nothing of a gVisor pod listens), and carries a megabyte intact.
func TestGVisorPortForward(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("gvisor-portforward")
	pod := d.runPod(t, kuasarGVisor, podCfg)
	d.run(t, pod, podCfg, ctrConfig("web", "sh", "-c",
		"mkdir -p /www && echo kuasar-gvisor-web > /www/index.html && head -c 1048576 /dev/urandom > /www/big && md5sum /www/big | cut -d' ' -f1 > /www/big.md5 && exec httpd -f -p 127.0.0.1:8080 -h /www"))
	if got := d.portForwardGet(t, pod, 8080, "/index.html"); strings.TrimSpace(got) != "kuasar-gvisor-web" {
		t.Fatalf("port-forward: %q", got)
	}
	want := strings.TrimSpace(d.portForwardGet(t, pod, 8080, "/big.md5"))
	big := d.portForwardGet(t, pod, 8080, "/big")
	if sum := fmt.Sprintf("%x", md5.Sum([]byte(big))); len(big) != 1<<20 || sum != want {
		t.Errorf("a megabyte through port-forward: %d bytes, md5 %s, want %s", len(big), sum, want)
	}
}
