//go:build e2e

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestLifecycle runs a pod and containers through their whole life:
// create, start, logs (stdout and stderr), exit codes, stop with grace,
// remove, on kuasar-runc and, as the reference, stock runc.
func TestLifecycle(t *testing.T) {
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			podCfg := d.podConfig("life")
			pod := d.runPod(t, handler, podCfg)
			if st := d.podState(t, pod); st != runtimeapi.PodSandboxState_SANDBOX_READY {
				t.Fatalf("pod state %v", st)
			}

			// A container that writes to both streams and exits 3.
			c1 := d.run(t, pod, podCfg, ctrConfig("exits", "sh", "-c", "echo out-line; echo err-line >&2; echo host=$(hostname); exit 3"))
			st := d.waitState(t, c1, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second)
			if st.ExitCode != 3 || st.Reason != "Error" {
				t.Fatalf("exit code %d reason %q, want 3 Error", st.ExitCode, st.Reason)
			}
			lines := readLog(t, st.LogPath)
			want := map[string]string{"out-line": "stdout", "err-line": "stderr", "host=life": "stdout"}
			for _, l := range lines {
				if s, ok := want[l.Text]; ok && s == l.Stream {
					delete(want, l.Text)
				}
			}
			if len(want) > 0 {
				t.Fatalf("log lines missing %v; got %+v", want, lines)
			}

			// A container that exits 0 is Completed.
			c2 := d.run(t, pod, podCfg, ctrConfig("ok", "true"))
			if st := d.waitState(t, c2, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second); st.ExitCode != 0 || st.Reason != "Completed" {
				t.Fatalf("exit %d reason %q", st.ExitCode, st.Reason)
			}

			// A long runner that ignores SIGTERM is killed after the grace period.
			c3 := d.run(t, pod, podCfg, ctrConfig("stubborn", "sh", "-c", "trap '' TERM; echo ready; while true; do sleep 1; done"))
			d.waitLog(t, c3, "ready", 10*time.Second)
			begin := time.Now()
			if _, err := d.RS.StopContainer(ctx(t), &runtimeapi.StopContainerRequest{ContainerId: c3, Timeout: 2}); err != nil {
				t.Fatal(err)
			}
			took := time.Since(begin)
			st = d.status(t, c3)
			if st.State != runtimeapi.ContainerState_CONTAINER_EXITED || st.ExitCode != 137 {
				t.Fatalf("after stop: %v exit %d", st.State, st.ExitCode)
			}
			if took < 2*time.Second {
				t.Fatalf("stop took %v: the grace period was not honoured", took)
			}

			// A container that handles SIGTERM exits with its own code.
			c4 := d.run(t, pod, podCfg, ctrConfig("polite", "sh", "-c", "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done"))
			d.waitLog(t, c4, "ready", 10*time.Second)
			if _, err := d.RS.StopContainer(ctx(t), &runtimeapi.StopContainerRequest{ContainerId: c4, Timeout: 10}); err != nil {
				t.Fatal(err)
			}
			if st := d.status(t, c4); st.ExitCode != 42 {
				t.Fatalf("polite exit code %d, want 42", st.ExitCode)
			}

			for _, c := range []string{c1, c2, c3, c4} {
				d.stopRemove(t, c, 0)
			}
			list, err := d.RS.ListContainers(ctx(t), &runtimeapi.ListContainersRequest{})
			if err != nil || len(list.Containers) != 0 {
				t.Fatalf("containers left: %v %v", list, err)
			}
			d.removePod(t, pod)
		})
	}
}

// TestExecSync checks output, exit codes and the pod's namespaces as seen
// from an exec.
func TestExecSync(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("execpod")
	podCfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.9.9.9"}, Searches: []string{"e2e.svc"}}
	podCfg.Linux.Sysctls = map[string]string{"kernel.shm_rmid_forced": "1", "net.ipv4.ip_local_port_range": "40000 40100"}
	pod := d.runPod(t, kuasarRunc, podCfg)
	c := d.run(t, pod, podCfg, ctrConfig("sleeper", "sleep", "3600"))

	tests := []struct {
		name     string
		cmd      []string
		stdout   string
		stderr   string
		exitCode int32
	}{
		{"echo", []string{"echo", "hi"}, "hi\n", "", 0},
		{"exit code", []string{"sh", "-c", "exit 7"}, "", "", 7},
		{"stderr", []string{"sh", "-c", "echo oops >&2"}, "", "oops\n", 0},
		{"hostname", []string{"hostname"}, "execpod\n", "", 0},
		{"resolv.conf", []string{"cat", "/etc/resolv.conf"}, "search e2e.svc\nnameserver 10.9.9.9\n", "", 0},
		{"ipc sysctl", []string{"cat", "/proc/sys/kernel/shm_rmid_forced"}, "1\n", "", 0},
		{"net sysctl", []string{"cat", "/proc/sys/net/ipv4/ip_local_port_range"}, "40000\t40100\n", "", 0},
		{"unprivileged ports", []string{"cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"}, "0\n", "", 0},
		{"own pid namespace", []string{"sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"}, "sleep 3600 ", "", 0},
		{"shm is the pod's tmpfs", []string{"sh", "-c", "grep ' /dev/shm ' /proc/mounts | cut -d' ' -f3"}, "tmpfs\n", "", 0},
		{"missing binary", []string{"/no/such/binary"}, "", "", -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: c, Cmd: tt.cmd, Timeout: 30})
			if tt.exitCode == -1 {
				if err == nil && r.ExitCode == 0 {
					t.Fatalf("exec of a missing binary succeeded: %+v", r)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(r.Stdout) != tt.stdout || string(r.Stderr) != tt.stderr || r.ExitCode != tt.exitCode {
				t.Fatalf("got stdout %q stderr %q exit %d; want %q %q %d", r.Stdout, r.Stderr, r.ExitCode, tt.stdout, tt.stderr, tt.exitCode)
			}
		})
	}

	// The exec timeout kills a runaway exec and leaves the container running.
	begin := time.Now()
	_, err := d.RS.ExecSync(ctx(t), &runtimeapi.ExecSyncRequest{ContainerId: c, Cmd: []string{"sleep", "60"}, Timeout: 1})
	if err == nil {
		t.Fatal("exec past its timeout did not fail")
	}
	if time.Since(begin) > 20*time.Second {
		t.Fatalf("exec timeout took %v", time.Since(begin))
	}
	if st := d.status(t, c); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("container %v after exec timeout", st.State)
	}
}

// TestSharedPIDNamespace: a pod that shares its PID namespace sees one
// init and every container's processes, with no pause container.
func TestSharedPIDNamespace(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("sharedpid")
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	pod := d.runPod(t, kuasarRunc, podCfg)
	a := ctrConfig("a", "sleep", "3601")
	a.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	b := ctrConfig("b", "sleep", "3602")
	b.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_POD
	ca := d.run(t, pod, podCfg, a)
	d.run(t, pod, podCfg, b)
	out, _, code := d.execSync(t, ca, "ps", "-o", "pid,args")
	if code != 0 || !strings.Contains(out, "sleep 3601") || !strings.Contains(out, "sleep 3602") {
		t.Fatalf("containers do not share a PID namespace:\n%s", out)
	}
	if fields := strings.Fields(strings.Split(out, "\n")[1]); len(fields) < 2 || fields[0] != "1" || fields[1] != "/pause" {
		t.Fatalf("pid 1 of the pod is not its holder: %q", out)
	}
}

// TestStats reads container and pod stats through CRI.
func TestStats(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("stats")
	pod := d.runPod(t, kuasarRunc, podCfg)
	c := d.run(t, pod, podCfg, ctrConfig("busy", "sh", "-c", "x=$(head -c 4000000 /dev/zero | tr '\\0' a); while true; do :; done"))
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: c})
		if err != nil {
			t.Fatal(err)
		}
		s := r.Stats
		if s.GetMemory().GetWorkingSetBytes().GetValue() > 1<<20 && s.GetCpu().GetUsageCoreNanoSeconds().GetValue() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container stats stay empty: %+v", s)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for {
		r, err := d.RS.PodSandboxStats(ctx(t), &runtimeapi.PodSandboxStatsRequest{PodSandboxId: pod})
		if err != nil {
			t.Fatal(err)
		}
		l := r.Stats.GetLinux()
		if l.GetMemory().GetWorkingSetBytes().GetValue() > 1<<20 && l.GetCpu().GetUsageCoreNanoSeconds().GetValue() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod stats stay empty: %+v", l)
		}
		time.Sleep(200 * time.Millisecond)
	}
	out := d.crictlOut(t, "stats", "-o", "json", c)
	if !strings.Contains(out, "workingSetBytes") {
		t.Fatalf("crictl stats: %s", out)
	}
}

// TestResourceLimits: CPU and memory limits reach the container's cgroup,
// can be updated, and a container past its memory limit is OOMKilled.
func TestResourceLimits(t *testing.T) {
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			podCfg := d.podConfig("limits")
			pod := d.runPod(t, handler, podCfg)

			cfg := ctrConfig("limited", "sleep", "3600")
			cfg.Linux.Resources = &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 50000, MemoryLimitInBytes: 64 << 20}
			c := d.run(t, pod, podCfg, cfg)
			cg := containerCgroup(t, d, c)
			expectCgroup(t, cg, "cpu", "cpu.cfs_quota_us", "50000", "cpu.max", "50000 100000")
			expectCgroup(t, cg, "memory", "memory.limit_in_bytes", fmt.Sprint(64<<20), "memory.max", fmt.Sprint(64<<20))

			_, err := d.RS.UpdateContainerResources(ctx(t), &runtimeapi.UpdateContainerResourcesRequest{
				ContainerId: c,
				Linux:       &runtimeapi.LinuxContainerResources{CpuPeriod: 100000, CpuQuota: 20000, MemoryLimitInBytes: 96 << 20},
			})
			if err != nil {
				t.Fatal(err)
			}
			expectCgroup(t, cg, "cpu", "cpu.cfs_quota_us", "20000", "cpu.max", "20000 100000")
			expectCgroup(t, cg, "memory", "memory.limit_in_bytes", fmt.Sprint(96<<20), "memory.max", fmt.Sprint(96<<20))

			hog := ctrConfig("hog", "sh", "-c", "echo start; exec dd if=/dev/zero of=/dev/null bs=128M count=1")
			hog.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 32 << 20}
			h := d.run(t, pod, podCfg, hog)
			st := d.waitState(t, h, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second)
			if st.Reason != "OOMKilled" || st.ExitCode != 137 {
				t.Fatalf("memory hog: reason %q exit %d, want OOMKilled 137", st.Reason, st.ExitCode)
			}
		})
	}
}

// containerCgroup finds a container's cgroup path from its init's /proc.
func containerCgroup(t *testing.T, d *Daemon, id string) string {
	t.Helper()
	out, _, _ := d.execSync(t, id, "cat", "/proc/1/cgroup")
	for _, line := range strings.Split(out, "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 && (strings.Contains(parts[1], "memory") || parts[1] == "") && parts[2] != "/" {
			return parts[2]
		}
	}
	// Inside a cgroup namespace the path reads "/": use the pod's parent.
	return ""
}

// expectCgroup checks a limit in the container's cgroup (v1 file or v2 file).
func expectCgroup(t *testing.T, cgPath, controller, v1file, v1want, v2file, v2want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var got string
		var want string
		if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
			b, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup", cgPath, v2file))
			got, want = strings.TrimSpace(string(b)), v2want
		} else {
			b, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup", controller, cgPath, v1file))
			got, want = strings.TrimSpace(string(b)), v1want
		}
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("cgroup %s %s = %q, want %q", cgPath, controller, got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
