// Package cgroupstats locates the cgroup of a container or pod and reads
// what containerd's CRI wants from it: metrics in containerd's cgroup v1 or
// v2 format, and the number of OOM kills.
package cgroupstats

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	"github.com/containerd/cgroups/v3/cgroup2"
	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"
)

const root = "/sys/fs/cgroup"

// Paths locates a cgroup: on cgroup v2 one path, on v1 a path per
// controller; paths are relative to the hierarchy roots.
type Paths struct {
	Unified     string            `json:"unified,omitempty"`
	Controllers map[string]string `json:"controllers,omitempty"`
}

// Unified reports whether the host runs cgroup v2 only.
func Unified() bool { return cgroups.Mode() == cgroups.Unified }

// StaticPaths is the same path under every controller.
func StaticPaths(path string) Paths {
	if Unified() {
		return Paths{Unified: path}
	}
	return Paths{Controllers: map[string]string{"*": path}}
}

// ExpandSlice turns a systemd slice name into its cgroup path:
// "kubepods-burstable-pod1.slice" is
// "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice".
// A path (with slashes) is returned as it is.
func ExpandSlice(slice string) string {
	if strings.Contains(slice, "/") || !strings.HasSuffix(slice, ".slice") {
		return slice
	}
	name := strings.TrimSuffix(slice, ".slice")
	if name == "" || name == "-" {
		return "/"
	}
	var b strings.Builder
	prefix := ""
	for _, part := range strings.Split(name, "-") {
		if part == "" {
			return slice // not a valid slice name; leave it be
		}
		b.WriteString("/" + prefix + part + ".slice")
		prefix += part + "-"
	}
	return b.String()
}

// SpecPath turns an OCI spec's cgroups path into a cgroupfs path: CRI's
// systemd form "slice:prefix:name" is the scope "prefix-name.scope" below
// the expanded slice; a path is returned as it is.
func SpecPath(cgroupsPath string) string {
	parts := strings.Split(cgroupsPath, ":")
	if len(parts) != 3 || !strings.HasSuffix(parts[0], ".slice") {
		return cgroupsPath
	}
	scope := parts[2] + ".scope"
	if parts[1] != "" {
		scope = parts[1] + "-" + scope
	}
	return strings.TrimSuffix(ExpandSlice(parts[0]), "/") + "/" + scope
}

// PidPaths reads where pid's cgroups are.
func PidPaths(pid int) (Paths, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return Paths{}, err
	}
	defer f.Close()
	return parseProcCgroup(bufio.NewScanner(f), Unified())
}

func parseProcCgroup(sc *bufio.Scanner, unified bool) (Paths, error) {
	p := Paths{Controllers: map[string]string{}}
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			p.Unified = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			c = strings.TrimPrefix(c, "name=")
			p.Controllers[c] = parts[2]
		}
	}
	if err := sc.Err(); err != nil {
		return Paths{}, err
	}
	if unified {
		p.Controllers = nil
		if p.Unified == "" {
			return Paths{}, errors.New("no cgroup v2 entry")
		}
	} else {
		p.Unified = ""
		if len(p.Controllers) == 0 {
			return Paths{}, errors.New("no cgroup v1 entries")
		}
	}
	return p, nil
}

func (p Paths) v1Path() cgroup1.Path {
	return func(name cgroup1.Name) (string, error) {
		if v, ok := p.Controllers[string(name)]; ok {
			return v, nil
		}
		if v, ok := p.Controllers["*"]; ok {
			return v, nil
		}
		return "", cgroup1.ErrControllerNotActive
	}
}

// Metrics reads the cgroup's metrics as containerd's CRI expects them.
func Metrics(p Paths) (*anypb.Any, error) {
	var (
		m   any
		err error
	)
	if p.Unified != "" {
		var cg *cgroup2.Manager
		if cg, err = cgroup2.Load(p.Unified); err == nil {
			m, err = cg.Stat()
		}
	} else {
		var cg cgroup1.Cgroup
		if cg, err = cgroup1.Load(p.v1Path()); err == nil {
			m, err = cg.Stat(cgroup1.IgnoreNotExist)
		}
	}
	if errors.Is(err, cgroup1.ErrCgroupDeleted) || errors.Is(err, os.ErrNotExist) {
		// Not created yet (a pod before its first container) or gone.
		m, err = emptyMetrics(p), nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading cgroup metrics: %w", err)
	}
	a, err := typeurl.MarshalAny(m)
	if err != nil {
		return nil, err
	}
	return typeurl.MarshalProto(a), nil
}

func emptyMetrics(p Paths) any {
	if p.Unified != "" {
		return &v2stats.Metrics{}
	}
	return &v1stats.Metrics{}
}

// OOMKills returns how many processes of the cgroup the OOM killer killed.
func OOMKills(p Paths) (uint64, error) {
	var file string
	if p.Unified != "" {
		file = filepath.Join(root, p.Unified, "memory.events")
	} else {
		mp, err := p.v1Path()(cgroup1.Memory)
		if err != nil {
			return 0, err
		}
		file = filepath.Join(root, "memory", mp, "memory.oom_control")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, err
	}
	return fieldValue(string(b), "oom_kill")
}

func fieldValue(content, key string) (uint64, error) {
	for _, line := range strings.Split(content, "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == key {
			return strconv.ParseUint(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s field", key)
}
