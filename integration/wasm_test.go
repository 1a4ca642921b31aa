//go:build e2e

package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasm"
)

// wasmPod starts a daemon with a kuasar-wasm pod and the Wasm images.
func wasmPod(t *testing.T, name string) (*Daemon, string, *runtimeapi.PodSandboxConfig) {
	d := startDaemon(t, daemonOptions{})
	for _, img := range []string{images.WasmLayer, images.WasmRootfs} {
		d.pull(t, img)
	}
	cfg := d.podConfig(name)
	cfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
	return d, d.runPod(t, kuasarWasm, cfg), cfg
}

// checkWasmPodFiles runs a module that prints the pod's files: it must see
// the pod's hostname, DNS and hosts, as a container of any handler does.
func checkWasmPodFiles(t *testing.T, d *Daemon, pod string, podCfg *runtimeapi.PodSandboxConfig, when string) {
	t.Helper()
	for _, tc := range []struct{ file, want string }{
		{"/etc/hostname", podCfg.Hostname + "\n"},
		{"/etc/resolv.conf", "nameserver 10.96.0.10"},
		{"/etc/resolv.conf", "search e2e.svc.cluster.local"},
		{"/etc/hosts", "localhost"},
	} {
		c := d.run(t, pod, podCfg, wasmConfig("files-"+randHex(3), images.WasmLayer, "cat", tc.file))
		st, log := d.finished(t, c)
		if st.ExitCode != 0 || !strings.Contains(log, strings.TrimSuffix(tc.want, "\n")) {
			t.Errorf("%s: a module reading %s: exit %d\n%s", when, tc.file, st.ExitCode, log)
		}
		d.stopRemove(t, c, 0)
	}
}

// exited waits for a container to exit and returns its status and log.
func (d *Daemon) finished(t *testing.T, id string) (*runtimeapi.ContainerStatus, string) {
	t.Helper()
	st := d.waitState(t, id, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second)
	var b strings.Builder
	for _, l := range readLog(t, st.LogPath) {
		fmt.Fprintf(&b, "%s %s\n", l.Stream, l.Text)
	}
	return st, b.String()
}

// TestWasmRun runs modules of both image layouts through CRI: arguments,
// environment, working directory, the image's files, CRI mounts, exit codes,
// stdout and stderr in the CRI log, several containers in one pod.
func TestWasmRun(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-run")
	vol := t.TempDir()
	must(t, os.WriteFile(filepath.Join(vol, "greeting"), []byte("from a volume\n"), 0o644), "writing volume")
	tests := []struct {
		name   string
		image  string
		args   []string
		mutate func(*runtimeapi.ContainerConfig)
		code   int32
		want   []string
	}{
		{name: "layer", image: images.WasmLayer, args: []string{"hello", "a b"}, want: []string{`stdout hello from wasm: args=["/app.wasm" "hello" "a b"] cwd=/`}},
		{name: "rootfs", image: images.WasmRootfs, args: []string{"hello"}, want: []string{`args=["/app/app.wasm" "hello"] cwd=/app`}},
		{name: "env", image: images.WasmRootfs, args: []string{"env"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Envs = []*runtimeapi.KeyValue{{Key: "GREETING", Value: []byte("hi there")}}
		}, want: []string{"GREETING=hi there", "PATH=/app"}},
		{name: "image files", image: images.WasmRootfs, args: []string{"cat", "/app/notes.txt"}, want: []string{"a file of the image"}},
		{name: "pod files", image: images.WasmRootfs, args: []string{"cat", "/etc/hostname"}, want: []string{"wasm-run"}},
		{name: "exit code", image: images.WasmLayer, args: []string{"exit", "7"}, code: 7, want: []string{"exiting with 7"}},
		{name: "stderr", image: images.WasmLayer, args: []string{"stderr", "to", "stderr"}, want: []string{"stderr to stderr"}},
		{name: "working dir", image: images.WasmRootfs, args: []string{"hello"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.WorkingDir = "/data"
		}, want: []string{"cwd=/data"}},
		{name: "read-only mount", image: images.WasmRootfs, args: []string{"cat", "/vol/greeting"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Mounts = []*runtimeapi.Mount{{ContainerPath: "/vol", HostPath: vol, Readonly: true}}
		}, want: []string{"from a volume"}},
		{name: "read-only mount refuses writes", image: images.WasmRootfs, args: []string{"write", "/vol/x", "y"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Mounts = []*runtimeapi.Mount{{ContainerPath: "/vol", HostPath: vol, Readonly: true}}
		}, code: 1, want: []string{"read-only file system"}},
		{name: "writable layer", image: images.WasmRootfs, args: []string{"write", "/data/out", "z"}, want: []string{"wrote /data/out"}},
		{name: "read-only rootfs", image: images.WasmRootfs, args: []string{"write", "/data/out", "z"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Linux.SecurityContext = &runtimeapi.LinuxContainerSecurityContext{ReadonlyRootfs: true}
		}, code: 1, want: []string{"read-only file system"}},
		{name: "trap", image: images.WasmLayer, args: []string{"trap"}, code: 134, want: []string{"kuasar-wasm: the module trapped"}},
		{name: "run as user", image: images.WasmRootfs, args: []string{"write", "/app/x", "y"}, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Linux.SecurityContext = &runtimeapi.LinuxContainerSecurityContext{RunAsUser: &runtimeapi.Int64Value{Value: 1000}}
		}, code: 1, want: []string{"permission denied"}},
		{name: "other module of the image", image: images.WasmRootfs, mutate: func(c *runtimeapi.ContainerConfig) {
			c.Command = []string{"hello.wasm"}
		}, want: []string{"hello from wasm"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := wasmConfig(fmt.Sprintf("run%d", i), tt.image, tt.args...)
			if tt.mutate != nil {
				tt.mutate(cfg)
			}
			c := d.run(t, pod, podCfg, cfg)
			st, log := d.finished(t, c)
			for _, w := range tt.want {
				if !strings.Contains(strings.ToLower(log), strings.ToLower(w)) {
					t.Errorf("log lacks %q:\n%s", w, log)
				}
			}
			if st.ExitCode != tt.code {
				t.Errorf("exit code %d, want %d; log:\n%s", st.ExitCode, tt.code, log)
			}
			d.stopRemove(t, c, 0)
		})
	}
	// crictl logs reads the same log.
	c := d.run(t, pod, podCfg, wasmConfig("crictl", images.WasmLayer, "echo", "via crictl"))
	d.finished(t, c)
	if out := d.crictlOut(t, "logs", c); !strings.Contains(out, "via crictl") {
		t.Errorf("crictl logs: %q", out)
	}
}

// TestWasmLifecycle covers several running containers in one pod, stop
// with a grace period of a module in an endless loop, the kubelet's restart
// of a container (a new attempt), exec, stdin and stats.
func TestWasmLifecycle(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-life")
	ticker := d.run(t, pod, podCfg, wasmConfig("ticker", images.WasmLayer, "tick"))
	loop := d.run(t, pod, podCfg, wasmConfig("loop", images.WasmRootfs, "loop"))
	d.waitLog(t, ticker, "tick 3", 10*time.Second)
	d.waitLog(t, loop, "looping", 10*time.Second)

	// Stats: a spinning module uses CPU, a module has memory.
	time.Sleep(time.Second)
	r, err := d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: loop})
	must(t, err, "ContainerStats")
	if r.Stats.Cpu.GetUsageCoreNanoSeconds().GetValue() == 0 || r.Stats.Memory.GetWorkingSetBytes().GetValue() == 0 {
		t.Errorf("stats of a spinning module: cpu %v, memory %v", r.Stats.Cpu, r.Stats.Memory)
	}
	ps, err := d.RS.PodSandboxStats(ctx(t), &runtimeapi.PodSandboxStatsRequest{PodSandboxId: pod})
	must(t, err, "PodSandboxStats")
	if ps.Stats.Linux.GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 || ps.Stats.Linux.GetMemory().GetWorkingSetBytes().GetValue() == 0 {
		t.Errorf("pod stats: %v", ps.Stats.Linux)
	}
	if out := d.crictlOut(t, "stats", "-o", "json", loop); !strings.Contains(out, "workingSetBytes") {
		t.Errorf("crictl stats: %s", out)
	}

	// Exec runs the container's module again, or another of its image.
	if out, _, code := d.execSync(t, ticker, "/app.wasm", "echo", "exec works"); code != 0 || out != "exec works\n" {
		t.Errorf("exec of the module: %q %d", out, code)
	}
	_, err = d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: ticker, Cmd: []string{"sh", "-c", "true"}, Timeout: 10})
	expectErr(t, err, "kuasar-wasm")
	if out, _, code := d.execSync(t, loop, "app", "exit", "4"); code != 4 || !strings.Contains(out, "exiting with 4") {
		t.Errorf("exec with PATH lookup: %q %d", out, code)
	}

	// Stop with a grace period: a module cannot handle SIGTERM, so it ends
	// at once, even in an endless loop.
	begin := time.Now()
	_, err = d.RS.StopContainer(ctx(t), &runtimeapi.StopContainerRequest{ContainerId: loop, Timeout: 10})
	must(t, err, "StopContainer")
	if took := time.Since(begin); took > 9*time.Second {
		t.Errorf("stopping a looping module took %v: it waited for the grace period", took)
	}
	if st := d.status(t, loop); st.State != runtimeapi.ContainerState_CONTAINER_EXITED || st.ExitCode != 143 {
		t.Errorf("stopped loop: %v exit %d, want exited 143", st.State, st.ExitCode)
	}

	// The kubelet restarts a container as a new attempt of the same name.
	first := d.run(t, pod, podCfg, wasmConfig("job", images.WasmLayer, "exit", "1"))
	if st, _ := d.finished(t, first); st.ExitCode != 1 {
		t.Fatalf("first attempt exit %d", st.ExitCode)
	}
	again := wasmConfig("job", images.WasmLayer, "echo", "second attempt")
	again.Metadata.Attempt = 1
	second := d.run(t, pod, podCfg, again)
	if st, log := d.finished(t, second); st.ExitCode != 0 || !strings.Contains(log, "second attempt") {
		t.Fatalf("second attempt: %d %s", st.ExitCode, log)
	}

	// Stdin, closed when the attach with stdin_once ends.
	in := wasmConfig("stdin", images.WasmLayer, "stdin")
	in.Stdin, in.StdinOnce = true, true
	s := d.run(t, pod, podCfg, in)
	cmd := d.crictl("attach", "-i", s)
	cmd.Stdin = strings.NewReader("line-from-attach\n")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("attach -i: %v %s", err, b)
	}
	if st, log := d.finished(t, s); st.ExitCode != 0 || !strings.Contains(log, "line-from-attach") || !strings.Contains(log, "stdin closed after 17 bytes") {
		t.Fatalf("stdin container: exit %d\n%s", st.ExitCode, log)
	}

	// The ticker ran all along; stop and remove it with the pod.
	d.waitLog(t, ticker, "tick 20", 10*time.Second)
	d.removePod(t, pod)
}

// TestWasmLimits: memory limits of a container and of its pod kill the
// module that grows past them (OOMKilled); CPU limits of a container and of
// its pod bound the CPU time of spinning modules; a module's trap or loop
// does not disturb another pod.
func TestWasmLimits(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-limits")

	hog := wasmConfig("hog", images.WasmLayer, "hog", "8")
	hog.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 64 << 20}
	h := d.run(t, pod, podCfg, hog)
	st, log := d.finished(t, h)
	if st.Reason != "OOMKilled" || st.ExitCode != 137 || !strings.Contains(log, "allocated MiB: 32") {
		t.Errorf("memory hog: reason %q exit %d, want OOMKilled 137; log:\n%s", st.Reason, st.ExitCode, log)
	}

	// The pod's limit, as the kubelet sets it on the pod's cgroup.
	podCg := podCfg.Linux.CgroupParent
	limitFile := filepath.Join("/sys/fs/cgroup/memory", podCg, "memory.limit_in_bytes")
	must(t, os.MkdirAll(filepath.Dir(limitFile), 0o755), "pod memory cgroup")
	must(t, os.WriteFile(limitFile, []byte(fmt.Sprint(96<<20)), 0), "pod memory limit")
	a := d.run(t, pod, podCfg, wasmConfig("hold", images.WasmLayer, "hold", "40"))
	d.waitLog(t, a, "holding MiB: 40", 10*time.Second)
	b := d.run(t, pod, podCfg, wasmConfig("hog2", images.WasmLayer, "hog", "8"))
	if st, log := d.finished(t, b); st.Reason != "OOMKilled" || strings.Contains(log, "allocated MiB: 64") {
		t.Errorf("pod memory limit: reason %q exit %d; log:\n%s", st.Reason, st.ExitCode, log)
	}
	if st := d.status(t, a); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Errorf("the module within the pod's limit was stopped: %v", st.State)
	}
	d.stopRemove(t, a, 0)

	// CPU: a container limited to 0.2 CPU, then two unlimited containers
	// of a pod limited to 0.3 CPU by its cgroup.
	spin := wasmConfig("spin", images.WasmLayer, "loop")
	spin.Linux.Resources = &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 20000}
	s := d.run(t, pod, podCfg, spin)
	// The limits are ceilings: a loaded machine may give less.
	if used := cpuOver(t, d, 2*time.Second, s); used > 0.3 || used == 0 {
		t.Errorf("a container limited to 0.2 CPU used %.2f CPU", used)
	}
	d.stopRemove(t, s, 0)

	cpuPod := d.podConfig("wasm-cpu")
	cp := d.runPod(t, kuasarWasm, cpuPod)
	quota := filepath.Join("/sys/fs/cgroup/cpu", cpuPod.Linux.CgroupParent, "cpu.cfs_quota_us")
	must(t, os.MkdirAll(filepath.Dir(quota), 0o755), "pod cpu cgroup")
	must(t, os.WriteFile(quota, []byte("30000"), 0), "pod cpu quota")
	s1 := d.run(t, cp, cpuPod, wasmConfig("spin1", images.WasmLayer, "loop"))
	s2 := d.run(t, cp, cpuPod, wasmConfig("spin2", images.WasmLayer, "loop"))
	if used := cpuOver(t, d, 2*time.Second, s1, s2); used > 0.45 || used == 0 {
		t.Errorf("two modules of a pod limited to 0.3 CPU used %.2f CPU", used)
	}

	// Meanwhile a module of another pod keeps going, and a trap in this
	// one leaves it be.
	other := d.podConfig("wasm-other")
	op := d.runPod(t, kuasarWasm, other)
	tick := d.run(t, op, other, wasmConfig("tick", images.WasmLayer, "tick"))
	trap := d.run(t, pod, podCfg, wasmConfig("trap", images.WasmLayer, "trap"))
	if st, _ := d.finished(t, trap); st.ExitCode != 134 {
		t.Errorf("trap exit %d", st.ExitCode)
	}
	before := countLines(t, d, tick)
	deadline := time.Now().Add(10 * time.Second)
	for countLines(t, d, tick) < before+5 {
		if time.Now().After(deadline) {
			t.Fatalf("a module of another pod stopped: %d lines in 10s", countLines(t, d, tick)-before)
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.removePod(t, cp)
	d.removePod(t, op)
	d.removePod(t, pod)
}

// cpuOver measures the CPU the containers use over d, in CPUs.
func cpuOver(t *testing.T, d *Daemon, over time.Duration, ids ...string) float64 {
	t.Helper()
	total := func() uint64 {
		var sum uint64
		for _, id := range ids {
			r, err := d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: id})
			must(t, err, "ContainerStats")
			sum += r.Stats.Cpu.GetUsageCoreNanoSeconds().GetValue()
		}
		return sum
	}
	time.Sleep(300 * time.Millisecond)
	a, begin := total(), time.Now()
	time.Sleep(over)
	b := total()
	if b < a {
		t.Fatalf("CPU usage went back from %d to %d ns", a, b)
	}
	used := float64(b-a) / float64(time.Since(begin))
	t.Logf("%d containers used %.2f CPU", len(ids), used)
	return used
}

// TestWasmNetwork: a Wasm pod gets its network from CNI like any pod, and a
// module serves on a listening socket it gets pre-opened in the pod's
// network namespace.
func TestWasmNetwork(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-net")
	ps, err := d.RS.PodSandboxStatus(ctx(t), &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod})
	must(t, err, "PodSandboxStatus")
	ip := ps.Status.GetNetwork().GetIp()
	if net.ParseIP(ip) == nil {
		t.Fatalf("wasm pod has no IP: %v", ps.Status.GetNetwork())
	}
	cfg := wasmConfig("server", images.WasmLayer, "serve")
	cfg.Annotations = map[string]string{wasm.ListenAnnotation: "0.0.0.0:8080"}
	c := d.run(t, pod, podCfg, cfg)
	d.waitLog(t, c, "serving on", 10*time.Second)
	addr := net.JoinHostPort(ip, "8080")
	must(t, waitPort(addr, 10*time.Second), "pod port")
	for i := 0; i < 3; i++ {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		must(t, err, "dial %s", addr)
		fmt.Fprintf(conn, "GET /%d HTTP/1.0\r\n\r\n", i)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		must(t, err, "response")
		body, _ := io.ReadAll(resp.Body)
		conn.Close()
		if want := fmt.Sprintf("hello from wasm over http: GET /%d", i); !strings.Contains(string(body), want) {
			t.Fatalf("reply %q, want %q", body, want)
		}
	}
	// Waiting for connections costs next to no CPU (a spinning module would
	// use a whole core).
	if used := cpuOver(t, d, 2*time.Second, c); used > 0.5 {
		t.Errorf("an idle server uses %.2f CPU", used)
	}
	d.stopRemove(t, c, 2)
	d.removePod(t, pod)
}

// TestWasmRestart restarts the daemon (SIGTERM, then SIGKILL) with Wasm
// pods running: they keep running, logs continue, a module that exits while
// the daemon is down reports its exit code, stop and remove work.
func TestWasmRestart(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			d, pod, podCfg := wasmPod(t, "wasm-restart")
			ticker := d.run(t, pod, podCfg, wasmConfig("ticker", images.WasmLayer, "tick"))
			late := d.run(t, pod, podCfg, wasmConfig("late", images.WasmRootfs, "sleep", "3"))
			d.waitLog(t, ticker, "tick 2", 10*time.Second)
			d.waitLog(t, late, "sleeping", 10*time.Second)
			tid := d.status(t, ticker)

			d.kill(sig)
			time.Sleep(4 * time.Second) // "late" exits while the daemon is down
			d.start()

			if st := d.podState(t, pod); st != runtimeapi.PodSandboxState_SANDBOX_READY {
				t.Fatalf("pod %v after restart", st)
			}
			if st := d.status(t, ticker); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING || st.StartedAt != tid.StartedAt {
				t.Fatalf("ticker %v (started %d, was %d) after restart", st.State, st.StartedAt, tid.StartedAt)
			}
			if st, log := d.finished(t, late); st.ExitCode != 0 || !strings.Contains(log, "sleeping") {
				t.Fatalf("module that ended during the restart: exit %d\n%s", st.ExitCode, log)
			}
			before := countLines(t, d, ticker)
			deadline := time.Now().Add(10 * time.Second)
			for countLines(t, d, ticker) < before+5 {
				if time.Now().After(deadline) {
					t.Fatal("ticker log stopped after restart")
				}
				time.Sleep(100 * time.Millisecond)
			}
			if out, _, code := d.execSync(t, ticker, "/app.wasm", "echo", "alive"); code != 0 || out != "alive\n" {
				t.Fatalf("exec after restart: %q %d", out, code)
			}
			checkWasmPodFiles(t, d, pod, podCfg, "new container after restart")
			d.restart(syscall.SIGTERM)
			d.stopRemove(t, ticker, 2)
			d.stopRemove(t, late, 2)
			d.removePod(t, pod)
		})
	}
}

// TestWasmBadInput: images without a usable module fail with a clear error
// when the container's task is made (StartContainer, as for every
// handler), and leave nothing behind (the harness checks).
func TestWasmBadInput(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-bad")
	for _, img := range []string{images.WasmNoModule, images.WasmInvalid, images.WasmImports} {
		d.pull(t, img)
	}
	for _, tc := range []struct {
		name, image string
		cmd         []string
		mention     string
	}{
		{"not a module", images.WasmNoModule, nil, "not a WebAssembly module"},
		{"invalid module", images.WasmInvalid, nil, "invalid WebAssembly module"},
		{"missing imports", images.WasmImports, nil, "env.foo"},
		{"missing module", images.WasmRootfs, []string{"/app/missing.wasm"}, "not found"},
		{"escaping path", images.WasmRootfs, []string{"../../../../../bin/busybox"}, "not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := wasmConfig(strings.ReplaceAll(tc.name, " ", "-"), tc.image)
			cfg.Command = tc.cmd
			c := d.create(t, pod, podCfg, cfg)
			_, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: c})
			expectErr(t, err, tc.mention)
			_, err = d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: c})
			must(t, err, "removing a container that failed to start")
		})
	}
	// Pod-level input a Wasm pod cannot honour.
	bad := d.podConfig("wasm-sysctl")
	bad.Linux.Sysctls = map[string]string{"kernel.shm_rmid_forced": "1"}
	_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: bad, RuntimeHandler: kuasarWasm})
	expectErr(t, err, "only net.* sysctls")
	ok := d.podConfig("wasm-netsysctl")
	ok.Linux.Sysctls = map[string]string{"net.ipv4.ip_local_port_range": "40000 41000"}
	p := d.runPod(t, kuasarWasm, ok)
	d.removePod(t, p)
	d.removePod(t, pod)
}

// TestWasmNoProcesses: Wasm pods add no process to the node: every module
// runs in the one Wasm host.
func TestWasmNoProcesses(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-procs")
	first := d.run(t, pod, podCfg, wasmConfig("first", images.WasmLayer, "sleep"))
	d.waitLog(t, first, "sleeping", 10*time.Second)
	before := len(processesMentioning(d.Dir))
	var pods []string
	for i := 0; i < 5; i++ {
		cfg := d.podConfig("wasm-procs-" + strconv.Itoa(i))
		p := d.runPod(t, kuasarWasm, cfg)
		c := d.run(t, p, cfg, wasmConfig("sleep", images.WasmLayer, "sleep"))
		d.waitLog(t, c, "sleeping", 10*time.Second)
		pods = append(pods, p)
	}
	if after := len(processesMentioning(d.Dir)); after != before {
		t.Errorf("5 more Wasm pods changed the processes of the daemon's root from %d to %d", before, after)
	}
	for _, p := range pods {
		d.removePod(t, p)
	}
	d.removePod(t, pod)
}

// TestWasmMissingHost: without kuasar-wasm-host, a Wasm pod is refused with
// what to install and where to configure it; other handlers are unaffected.
func TestWasmMissingHost(t *testing.T) {
	d := startDaemon(t, daemonOptions{extraConfig: `
[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']
  host_path = "/nonexistent/kuasar-wasm-host"`})
	_, err := d.RS.RunPodSandbox(ctx(t), &runtimeapi.RunPodSandboxRequest{Config: d.podConfig("wasm-nohost"), RuntimeHandler: kuasarWasm})
	expectErr(t, err, "host_path")
	expectCode(t, err, codes.FailedPrecondition)
	cfg := d.podConfig("runc-still")
	d.removePod(t, d.runPod(t, kuasarRunc, cfg))
}
