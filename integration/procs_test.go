//go:build e2e || bench || conformance || pkg || kube

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

func comms(ps []proc) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Comm)
	}
	return out
}
