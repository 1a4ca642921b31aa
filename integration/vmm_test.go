//go:build e2e

package integration

import (
	"bytes"
	"crypto/md5"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestVMMLifecycle runs containers in a VM pod: exit codes, logs, the pod's
// files, exec, stop with a grace period, and that the node runs one
// hypervisor for the pod and nothing else of it.
func TestVMMLifecycle(t *testing.T) {
	d, pod, podCfg := vmmPod(t, "vmm-life", daemonOptions{})
	info := d.vmInfo(t, pod)
	t.Logf("pod VM: accel %s, boot %s, %d vCPU, %d MiB, hypervisor pid %d", info.Accel, info.Boot, info.VCPUs, info.MemoryMiB, info.VMPid)
	if info.VMPid == 0 || info.Accel == "" {
		t.Fatalf("pod info %+v", info)
	}

	c := d.run(t, pod, podCfg, ctrConfig("hello", "sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3"))
	st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 60*time.Second)
	if st.ExitCode != 3 {
		t.Errorf("exit code %d, want 3", st.ExitCode)
	}
	lines := readLog(t, st.LogPath)
	var out, errs []string
	for _, l := range lines {
		if l.Stream == "stdout" {
			out = append(out, l.Text)
		} else {
			errs = append(errs, l.Text)
		}
	}
	if strings.Join(out, "|") != "out-42" || strings.Join(errs, "|") != "err" {
		t.Errorf("log: stdout %q stderr %q", out, errs)
	}

	srv := d.run(t, pod, podCfg, ctrConfig("server", "sleep", "3600"))
	for _, tc := range []struct {
		cmd  []string
		want string
		code int32
	}{
		{[]string{"cat", "/etc/hostname"}, podCfg.Hostname + "\n", 0},
		{[]string{"hostname"}, podCfg.Hostname + "\n", 0},
		{[]string{"grep", "-c", "nameserver 10.96.0.10", "/etc/resolv.conf"}, "1\n", 0},
		{[]string{"sh", "-c", "grep -q localhost /etc/hosts && echo ok"}, "ok\n", 0},
		{[]string{"sh", "-c", "exit 5"}, "", 5},
		// The guest's kernel, not the node's.
		{[]string{"sh", "-c", "test \"$(uname -r)\" != \"" + unameR(t) + "\" && echo guest"}, "guest\n", 0},
	} {
		got, stderr, code := d.execSync(t, srv, tc.cmd...)
		if got != tc.want || code != tc.code {
			t.Errorf("exec %v: %q %q exit %d, want %q exit %d", tc.cmd, got, stderr, code, tc.want, tc.code)
		}
	}
	// Two containers of the pod share its IPC (/dev/shm).
	other := d.run(t, pod, podCfg, ctrConfig("other", "sleep", "3600"))
	if _, _, code := d.execSync(t, srv, "sh", "-c", "echo shared > /dev/shm/x"); code != 0 {
		t.Fatal("writing /dev/shm")
	}
	if got, _, _ := d.execSync(t, other, "cat", "/dev/shm/x"); got != "shared\n" {
		t.Errorf("/dev/shm is not the pod's: %q", got)
	}

	// The pod's processes on the node: the hypervisor only.
	if kids := childrenOf(info.VMPid); len(kids) > 0 {
		t.Errorf("the hypervisor has children on the node: %v", kids)
	}
	podCgroup := podCfg.Linux.CgroupParent + "/" + pod
	procs, err := os.ReadFile("/sys/fs/cgroup/memory" + podCgroup + "/cgroup.procs")
	if err != nil {
		t.Fatalf("the pod's cgroup: %v", err)
	}
	if got := strings.Fields(string(procs)); len(got) != 1 || got[0] != strconv.Itoa(info.VMPid) {
		var desc []string
		for _, p := range got {
			n, _ := strconv.Atoi(p)
			desc = append(desc, fmt.Sprintf("%d %s", n, cmdline(n)))
		}
		t.Errorf("processes of the pod's cgroup on the node: %v, want the hypervisor %d only", desc, info.VMPid)
	}

	begin := time.Now()
	d.stopRemove(t, srv, 2)
	t.Logf("stop (2 s grace, sleep ignores SIGTERM as pid 1) took %v", time.Since(begin).Round(time.Millisecond))
	d.stopRemove(t, other, 0)
	d.stopRemove(t, c, 0)
	d.removePod(t, pod)
}

func unameR(t *testing.T) string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var b []byte
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// TestVMMStreams: exec with and without a terminal, attach with stdin.
func TestVMMStreams(t *testing.T) {
	d, pod, podCfg := vmmPod(t, "vmm-streams", daemonOptions{})
	c := d.run(t, pod, podCfg, ctrConfig("sleeper", "sleep", "3600"))
	out := ptyRun(t, d.crictl("exec", "-it", c, "sh", "-c", "tty; echo in-a-tty; exit 4"), "", 60*time.Second)
	if !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "in-a-tty") {
		t.Errorf("exec -it showed %q", out)
	}
	cmd := d.crictl("exec", "-i", c, "sh", "-c", "read a; echo got-$a")
	cmd.Stdin = strings.NewReader("line\n")
	b, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(b), "got-line") {
		t.Errorf("exec -i: %v %q", err, b)
	}

	shell := ctrConfig("shell", "sh", "-c", `while read -r line; do eval "$line"; done`)
	shell.Stdin, shell.Tty = true, true
	sc := d.run(t, pod, podCfg, shell)
	d.waitState(t, sc, runtimeapi.ContainerState_CONTAINER_RUNNING, 30*time.Second)
	out = ptyRun(t, d.crictl("attach", "-it", sc), "echo attached-$((2+3))\nexit 3\n", 60*time.Second)
	if !strings.Contains(out, "attached-5") {
		t.Errorf("attach showed %q", out)
	}
	if st := d.waitState(t, sc, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second); st.ExitCode != 3 {
		t.Errorf("attached shell exit %d, want 3", st.ExitCode)
	}
}

// TestVMMLimits: a container's memory limit is enforced in the guest and
// its OOM kill reported as such; stats of the container and the pod.
func TestVMMLimits(t *testing.T) {
	d, pod, podCfg := vmmPod(t, "vmm-limits", daemonOptions{})
	hog := ctrConfig("hog", "sh", "-c", "x=$(head -c 80000000 /dev/zero | tr '\\0' a); echo survived")
	hog.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 24 << 20}
	c := d.run(t, pod, podCfg, hog)
	st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 120*time.Second)
	if st.Reason != "OOMKilled" || st.ExitCode != 137 {
		t.Errorf("memory hog: reason %q exit %d, want OOMKilled 137", st.Reason, st.ExitCode)
	}

	busy := d.run(t, pod, podCfg, ctrConfig("busy", "sh", "-c", "x=$(head -c 4000000 /dev/zero | tr '\\0' a); while true; do :; done"))
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: busy})
		if err == nil && r.Stats.GetMemory().GetWorkingSetBytes().GetValue() > 1<<20 && r.Stats.GetCpu().GetUsageCoreNanoSeconds().GetValue() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container stats stay empty: %+v %v", r, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	r, err := d.RS.PodSandboxStats(ctx(t), &runtimeapi.PodSandboxStatsRequest{PodSandboxId: pod})
	if err != nil || r.Stats.GetLinux().GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 {
		t.Errorf("pod stats: %+v %v", r, err)
	}
	// Update within the VM.
	if _, err := d.RS.UpdateContainerResources(ctx(t), &runtimeapi.UpdateContainerResourcesRequest{
		ContainerId: busy, Linux: &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 20000, MemoryLimitInBytes: 64 << 20},
	}); err != nil {
		t.Errorf("update: %v", err)
	}
	if got, stderr, _ := d.execSync(t, busy, "sh", "-c", "cat /sys/fs/cgroup/memory.max; grep cgroup /proc/self/mountinfo; cat /proc/self/cgroup"); !strings.HasPrefix(got, strconv.Itoa(64<<20)+"\n") {
		t.Errorf("memory.max in the guest after update: %q %q", got, stderr)
	}
}

// TestVMMPodNetwork: two VM pods reach each other by IP, and the node reaches
// a VM pod's server at the pod's IP.
func TestVMMPodNetwork(t *testing.T) {
	d, a, aCfg := vmmPod(t, "vmm-net-a", daemonOptions{})
	bCfg := d.podConfig("vmm-net-b")
	b := d.runPod(t, kuasarVMM, bCfg)
	ipA, ipB := podIP(t, d, a), podIP(t, d, b)
	srv := d.run(t, a, aCfg, ctrConfig("web", "sh", "-c", "mkdir -p /www && echo hello-from-the-vm > /www/index.html && httpd -f -p 8080 -h /www"))
	cli := d.run(t, b, bCfg, ctrConfig("client", "sleep", "3600"))
	_ = srv
	var got string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Second) {
		out, _, code := d.execSync(t, cli, "wget", "-q", "-O-", "http://"+ipA+":8080/")
		if code == 0 {
			got = out
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s cannot reach pod %s: %q", ipB, ipA, out)
		}
	}
	if got != "hello-from-the-vm\n" {
		t.Errorf("pod to pod: %q", got)
	}
	conn, err := net.DialTimeout("tcp", ipA+":8080", 10*time.Second)
	if err != nil {
		t.Fatalf("the node cannot reach the VM pod at %s: %v", ipA, err)
	}
	fmt.Fprintf(conn, "GET / HTTP/1.0\r\n\r\n")
	resp, _ := io.ReadAll(conn)
	conn.Close()
	if !bytes.Contains(resp, []byte("hello-from-the-vm")) {
		t.Errorf("node to pod: %q", resp)
	}
}

// TestVMMRestart restarts the daemon (SIGTERM, then SIGKILL) with a VM pod
// running: the VM and its containers live on, output written while the
// daemon was down is all in the log, an exit meanwhile keeps its code,
// and exec, new containers, stop and remove work.
func TestVMMRestart(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			d, pod, podCfg := vmmPod(t, "vmm-restart", daemonOptions{})
			vm := d.vmInfo(t, pod).VMPid
			ticker := d.run(t, pod, podCfg, ctrConfig("ticker", "sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done"))
			late := d.run(t, pod, podCfg, ctrConfig("late", "sh", "-c", "echo started; sleep 3; echo leaving; exit 7"))
			d.waitLog(t, ticker, "tick-3", 60*time.Second)
			d.waitLog(t, late, "started", 60*time.Second)

			before := len(readLog(t, d.logPath(t, ticker)))
			d.kill(sig)
			time.Sleep(5 * time.Second) // ticks and an exit while the daemon is down
			d.start()

			if got := d.vmInfo(t, pod).VMPid; got != vm {
				t.Fatalf("the pod's VM is %d after the restart, was %d", got, vm)
			}
			if st := d.waitState(t, late, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second); st.ExitCode != 7 {
				t.Errorf("exit while down: %d, want 7", st.ExitCode)
			}
			d.waitLog(t, late, "leaving", 30*time.Second)
			// Every tick, none lost while the daemon was down, and ticks
			// still coming after (however fast this machine runs the VM).
			d.waitLog(t, ticker, fmt.Sprintf("tick-%d", before+20), 60*time.Second)
			seq := regexp.MustCompile(`^tick-(\d+)$`)
			next := 0
			for _, l := range readLog(t, d.logPath(t, ticker)) {
				m := seq.FindStringSubmatch(l.Text)
				if m == nil {
					continue
				}
				n, _ := strconv.Atoi(m[1])
				if n > next {
					t.Fatalf("ticks %d..%d are missing from the log after the restart", next, n-1)
				}
				if n == next {
					next++
				}
			}
			if next < before+20 {
				t.Errorf("only %d ticks logged (%d before the daemon went down)", next, before)
			}
			if out, _, code := d.execSync(t, ticker, "echo", "alive"); code != 0 || out != "alive\n" {
				t.Errorf("exec after restart: %q %d", out, code)
			}
			nc := d.run(t, pod, podCfg, ctrConfig("after", "cat", "/etc/hostname"))
			if st := d.waitState(t, nc, runtimeapi.ContainerState_CONTAINER_EXITED, 60*time.Second); st.ExitCode != 0 {
				t.Errorf("new container after restart: exit %d", st.ExitCode)
			}
			d.stopRemove(t, ticker, 2)
			d.stopRemove(t, late, 0)
			d.stopRemove(t, nc, 0)
			d.removePod(t, pod)
		})
	}
}

// TestVMMPortForward: CRI's port-forward reaches a server that listens on
// the pod's localhost only, inside the VM, and carries a megabyte intact.
func TestVMMPortForward(t *testing.T) {
	d, pod, podCfg := vmmPod(t, "vmm-portforward", daemonOptions{})
	d.run(t, pod, podCfg, ctrConfig("web", "sh", "-c",
		"mkdir -p /www && echo kuasar-vm-web > /www/index.html && head -c 1048576 /dev/urandom > /www/big && md5sum /www/big | cut -d' ' -f1 > /www/big.md5 && exec httpd -f -p 127.0.0.1:8080 -h /www"))
	if got := d.portForwardGet(t, pod, 8080, "/index.html"); strings.TrimSpace(got) != "kuasar-vm-web" {
		t.Fatalf("port-forward: %q", got)
	}
	want := strings.TrimSpace(d.portForwardGet(t, pod, 8080, "/big.md5"))
	big := d.portForwardGet(t, pod, 8080, "/big")
	if sum := fmt.Sprintf("%x", md5.Sum([]byte(big))); len(big) != 1<<20 || sum != want {
		t.Errorf("a megabyte through port-forward: %d bytes, md5 %s, want %s", len(big), sum, want)
	}
}

// TestVMMBadInput: what a VM pod cannot be, and what a node may lack, each
// a clear error that leaves nothing behind.
func TestVMMBadInput(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t, daemonOptions{})
	hostNet := d.podConfig("vmm-hostnet")
	hostNet.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
	_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: hostNet, RuntimeHandler: kuasarVMM})
	expectError(t, err, codes.InvalidArgument, "network")

	for _, tc := range []struct {
		name, config string
		code         codes.Code
		mention      string
	}{
		{"missing kernel", `  kernel_path = "/nonexistent/vmlinux"` + "\n" + `  initrd_path = "/nonexistent/initrd"`, codes.FailedPrecondition, "kernel_path"},
		{"missing hypervisor", `  hypervisor_path = "/nonexistent/qemu"`, codes.NotFound, "hypervisor_path"},
		{"kvm asked for", `  accel = "kvm"`, codes.FailedPrecondition, "accel"},
		{"missing initramfs", fmt.Sprintf("  kernel_path = %q\n  initrd_path = \"/nonexistent/initrd\"", guestImage(t).Kernel), codes.FailedPrecondition, "initrd_path"},
		// A VM that does not answer in time: none does in a second here.
		{"VM too slow", "  boot_timeout = \"1s\"\n  template = \"off\"", codes.DeadlineExceeded, "boot_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "kvm asked for" && kvmUsable() {
				t.Skip("skipping: this node has a usable KVM")
			}
			d := startDaemon(t, daemonOptions{vmmConfig: tc.config})
			_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("vmm-bad"), RuntimeHandler: kuasarVMM})
			expectError(t, err, tc.code, tc.mention)
		})
	}
}

func kvmUsable() bool {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return (bytes.Contains(b, []byte(" vmx")) || bytes.Contains(b, []byte(" svm"))) && fileExists("/dev/kvm")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// expectError checks a CRI error's code and that its message names what
// to look at.
func expectError(t *testing.T, err error, code codes.Code, mention string) {
	t.Helper()
	expectCode(t, err, code)
	if !strings.Contains(err.Error(), mention) {
		t.Fatalf("error %v does not name %q", err, mention)
	}
	t.Logf("error as expected: %v", err)
}

// TestVMMTemplateClones: pods started from the template differ where they
// must (MAC, IP, clock, random numbers) and share nothing of each other's
// memory: a secret one writes is in its hypervisor's memory and not in the
// other's.
func TestVMMTemplateClones(t *testing.T) {
	d, a, aCfg := vmmPod(t, "vmm-clone-a", daemonOptions{})
	bCfg := d.podConfig("vmm-clone-b")
	b := d.runPod(t, kuasarVMM, bCfg)
	ia, ib := d.vmInfo(t, a), d.vmInfo(t, b)
	if ia.Boot != "template" || ib.Boot != "template" || ia.Template != ib.Template {
		t.Fatalf("pods not cloned from one template: %+v %+v", ia, ib)
	}
	ca := d.run(t, a, aCfg, ctrConfig("a", "sleep", "3600"))
	cb := d.run(t, b, bCfg, ctrConfig("b", "sleep", "3600"))
	type facts struct {
		mac, ip, random string
		now             int64 // the guest's clock, in seconds
		before, after   time.Time
	}
	get := func(c string) facts {
		mac, _, _ := d.execSync(t, c, "cat", "/sys/class/net/eth0/address")
		ip, _, _ := d.execSync(t, c, "sh", "-c", "ip -4 -o addr show eth0 | awk '{print $4}'")
		before := time.Now()
		now, _, _ := d.execSync(t, c, "date", "+%s")
		after := time.Now()
		random, _, _ := d.execSync(t, c, "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
		n, err := strconv.ParseInt(strings.TrimSpace(now), 10, 64)
		if err != nil {
			t.Fatalf("the guest's date: %q", now)
		}
		return facts{strings.TrimSpace(mac), strings.TrimSpace(ip), strings.TrimSpace(random), n, before, after}
	}
	fa, fb := get(ca), get(cb)
	if fa.mac == fb.mac || fa.ip == fb.ip || fa.random == fb.random || fa.mac == "" || fa.random == "" {
		t.Errorf("clones alike: %+v %+v", fa, fb)
	}
	for _, f := range []facts{fa, fb} {
		// The guest read its clock while the exec ran: within a second
		// (date's resolution) of that window.
		if f.now < f.before.Unix()-1 || f.now > f.after.Unix()+1 {
			t.Errorf("a clone's clock read %s, between %s and %s on the node", time.Unix(f.now, 0).UTC(), f.before.UTC(), f.after.UTC())
		}
	}
	secret := "kuasar-secret-" + randHex(8)
	if _, _, code := d.execSync(t, ca, "sh", "-c", "echo "+secret+" > /dev/shm/secret; cat /dev/shm/secret >/dev/null"); code != 0 {
		t.Fatal("writing the secret")
	}
	if !memoryHolds(t, ia.VMPid, secret) {
		t.Fatalf("the secret is not in its own VM's memory: the check cannot tell anything")
	}
	if memoryHolds(t, ib.VMPid, secret) {
		t.Errorf("the secret of one clone is in the other's memory")
	}
	// A pod of another namespace gets a template of its own
	// (template_scope "namespace"): its QEMU maps no RAM file of the
	// first namespace's, which that namespace's QEMUs hold open.
	oCfg := d.podConfig("vmm-clone-other")
	oCfg.Metadata.Namespace = "e2e-other"
	o := d.runPod(t, kuasarVMM, oCfg)
	io := d.vmInfo(t, o)
	if io.Boot != "template" || io.Template == ia.Template {
		t.Errorf("a pod of another namespace: %+v, the first namespace's template %s", io, ia.Template)
	}
	d.removePod(t, o)
}

// memoryHolds reports whether a process's memory holds s (scanning the
// readable private and shared mappings).
func memoryHolds(t *testing.T, pid int, s string) bool {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	needle := []byte(s)
	for _, line := range strings.Split(string(maps), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[1][0] != 'r' {
			continue
		}
		var start, end uint64
		if _, err := fmt.Sscanf(f[0], "%x-%x", &start, &end); err != nil {
			continue
		}
		buf := make([]byte, 1<<20)
		for off := start; off < end; off += uint64(len(buf) - len(needle)) {
			n, _ := mem.ReadAt(buf[:min(uint64(len(buf)), end-off)], int64(off))
			if n > 0 && bytes.Contains(buf[:n], needle) {
				return true
			}
			if n <= len(needle) {
				break
			}
		}
	}
	return false
}

var _ = pty.Start
