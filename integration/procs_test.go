//go:build e2e

package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// proc is a process seen in /proc.
type proc struct {
	Pid, PPid int
	Comm      string
	Cmdline   string
}

func readProc(pid int) (proc, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return proc{}, false
	}
	s := string(b)
	open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	f := strings.Fields(s[close+2:])
	if len(f) < 2 || f[0] == "Z" {
		return proc{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	return proc{Pid: pid, PPid: ppid, Comm: s[open+1 : close], Cmdline: cmdline(pid)}, true
}

func allProcs() []proc {
	var out []proc
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			if p, ok := readProc(pid); ok {
				out = append(out, p)
			}
		}
	}
	return out
}

// netnsInode is the inode of a network namespace file.
func netnsInode(path string) string {
	l, err := os.Readlink(path)
	if err != nil {
		st, err := os.Stat(path)
		if err != nil {
			return ""
		}
		return fmt.Sprint(statIno(st))
	}
	return strings.TrimSuffix(strings.TrimPrefix(l, "net:["), "]")
}

// podProcesses lists the processes living in a pod's network namespace.
func podProcesses(t *testing.T, d *Daemon, pod string) []proc {
	t.Helper()
	r, err := d.RS.PodSandboxStatus(ctx(t), &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	// CRI's netns path is recorded in the sandbox metadata; find it from a
	// container instead: the pod's containers all share the netns.
	var target string
	list, err := d.RS.ListContainers(ctx(t), &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{PodSandboxId: pod}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range list.Containers {
		if pid := containerPid(t, d, c.Id); pid > 0 {
			target = netnsInode(fmt.Sprintf("/proc/%d/ns/net", pid))
			break
		}
	}
	if target == "" {
		t.Fatalf("no running container in pod %s (%v)", short(pod), r.Status.State)
	}
	var out []proc
	for _, p := range allProcs() {
		if netnsInode(fmt.Sprintf("/proc/%d/ns/net", p.Pid)) == target {
			out = append(out, p)
		}
	}
	return out
}

// containerPid reads the pid CRI reports in a container's verbose status.
func containerPid(t *testing.T, d *Daemon, id string) int {
	t.Helper()
	r, err := d.RS.ContainerStatus(ctx(t), &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Pid int `json:"pid"`
	}
	_ = json.Unmarshal([]byte(r.Info["info"]), &info)
	return info.Pid
}

// shimsOf lists the shim processes serving a daemon.
func shimsOf(d *Daemon) []proc {
	var out []proc
	for _, p := range allProcs() {
		if strings.HasPrefix(p.Comm, "containerd-shim") && strings.Contains(p.Cmdline, d.Addr) {
			out = append(out, p)
		}
	}
	return out
}

// TestNoPauseNoShim runs a kuasar-runc pod next to a stock runc pod on the
// same daemon, and checks what each costs in processes: the stock pod a
// shim and a pause; the kuasar-runc pod nothing but its workload.
func TestNoPauseNoShim(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	kCfg, sCfg := d.podConfig("kuasar"), d.podConfig("stock")
	kPod := d.runPod(t, kuasarRunc, kCfg)
	sPod := d.runPod(t, stockRunc, sCfg)
	kc := d.run(t, kPod, kCfg, ctrConfig("work", "sleep", "3600"))
	sc := d.run(t, sPod, sCfg, ctrConfig("work", "sleep", "3600"))

	// Both work the same from the outside.
	for _, c := range []string{kc, sc} {
		if out, _, code := d.execSync(t, c, "sh", "-c", "hostname; ip -o -4 addr show eth0 | wc -l"); code != 0 || !strings.HasSuffix(out, "1\n") {
			t.Fatalf("container %s: %q (exit %d)", short(c), out, code)
		}
	}

	kProcs := podProcesses(t, d, kPod)
	if len(kProcs) != 1 || kProcs[0].Comm != "sleep" {
		t.Fatalf("kuasar-runc pod processes = %+v, want only its workload", kProcs)
	}
	sProcs := podProcesses(t, d, sPod)
	hasPause := false
	for _, p := range sProcs {
		hasPause = hasPause || p.Comm == "pause"
	}
	if !hasPause {
		t.Fatalf("stock pod has no pause process (%+v): the check cannot tell the two apart", sProcs)
	}
	shims := shimsOf(d)
	if len(shims) != 1 {
		t.Fatalf("shims serving the daemon = %+v, want exactly the stock pod's", shims)
	}
	for _, s := range shims {
		if strings.Contains(s.Cmdline, kPod) {
			t.Fatalf("a shim serves the kuasar-runc pod: %s", s.Cmdline)
		}
	}
	// The workload's parent is the node-wide keeper, not a per-pod process.
	kPid := containerPid(t, d, kc)
	parent, _ := readProc(kProcs[0].PPid)
	if kProcs[0].Pid != kPid || parent.Comm != "kuasar-keeper" {
		t.Fatalf("kuasar-runc workload %d parent = %+v, want the keeper", kPid, parent)
	}
	t.Logf("kuasar-runc pod: %d process(es) %v; stock pod: %d processes + %d shim", len(kProcs), comms(kProcs), len(sProcs), len(shims))
}

func comms(ps []proc) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Comm)
	}
	return out
}
