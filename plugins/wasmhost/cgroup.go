package wasmhost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// cgroupRoot is where the cgroup hierarchies are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// cpuCgroup bounds and accounts the CPU time of a container's threads.
//
// On cgroup v1 a thread can sit in a cgroup of its own in the cpu and
// cpuacct hierarchies, whatever cgroup the rest of its process is in: the
// container's thread joins the container's cgroup under the pod's
// cgroup_parent, so the kubelet's pod-level CPU limit applies to it as to a
// process. On cgroup v2 threads may only move within their process's
// threaded subtree: the container gets a threaded cgroup below the host's
// own, with the container's limits.
type cpuCgroup struct {
	v2   bool
	dirs []string // v1: one per hierarchy (cpu first when present); v2: one
}

// newCPUCgroup makes (or reuses) the cgroup of a container. path is the
// container's cgroup path in cgroupfs form; on v2, name names the
// container's threaded cgroup below the host's own.
func newCPUCgroup(path, name string) (*cpuCgroup, error) {
	if _, err := os.Stat(filepath.Join(cgroupRoot, "cgroup.controllers")); err == nil {
		return newThreadedCgroup(name)
	}
	cg := &cpuCgroup{}
	for _, ctrl := range []string{"cpu", "cpuacct"} {
		base := filepath.Join(cgroupRoot, ctrl)
		if st, err := os.Stat(filepath.Join(base, "tasks")); err != nil || st.IsDir() {
			continue
		}
		dir := filepath.Join(base, filepath.Clean("/"+path))
		if len(cg.dirs) > 0 && sameDir(cg.dirs[0], dir) {
			continue // cpu and cpuacct mounted together
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			cg.remove()
			return nil, fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
		cg.dirs = append(cg.dirs, dir)
	}
	if len(cg.dirs) == 0 {
		return nil, errors.New("no cpu or cpuacct cgroup hierarchy")
	}
	return cg, nil
}

func sameDir(a, b string) bool {
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}

// newThreadedCgroup makes a threaded cgroup below the host's own (v2).
func newThreadedCgroup(name string) (*cpuCgroup, error) {
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	var own string
	for _, line := range strings.Split(string(self), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			own = p
		}
	}
	if own == "" {
		return nil, errors.New("host is in no cgroup v2 cgroup")
	}
	base := filepath.Join(cgroupRoot, own)
	dir := filepath.Join(base, "wasm-"+strings.NewReplacer("/", "_", ":", "_").Replace(name))
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	cg := &cpuCgroup{v2: true, dirs: []string{dir}}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.type"), []byte("threaded"), 0); err != nil {
		cg.remove()
		return nil, fmt.Errorf("making %s threaded: %w", dir, err)
	}
	// Enabling cpu for the threaded children needs the host's parent to
	// delegate it; without it the cgroup still accounts.
	_ = os.WriteFile(filepath.Join(base, "cgroup.subtree_control"), []byte("+cpu"), 0)
	return cg, nil
}

// attach moves thread tid of the host into the cgroup.
func (cg *cpuCgroup) attach(tid int) error {
	file := "tasks"
	if cg.v2 {
		file = "cgroup.threads"
	}
	for _, d := range cg.dirs {
		if err := os.WriteFile(filepath.Join(d, file), []byte(strconv.Itoa(tid)), 0); err != nil {
			return fmt.Errorf("moving thread into %s: %w", d, err)
		}
	}
	return nil
}

// set applies CPU limits.
func (cg *cpuCgroup) set(l *api.Limits) error {
	d := cg.dirs[0]
	write := func(file, v string) error {
		if err := os.WriteFile(filepath.Join(d, file), []byte(v), 0); err != nil {
			return fmt.Errorf("setting %s: %w", file, err)
		}
		return nil
	}
	period := l.GetCpuPeriod()
	if period == 0 {
		period = 100000
	}
	if cg.v2 {
		quota := "max"
		if l.GetCpuQuota() > 0 {
			quota = strconv.FormatInt(l.GetCpuQuota(), 10)
		}
		if _, err := os.Stat(filepath.Join(d, "cpu.max")); err != nil {
			if l.GetCpuQuota() > 0 {
				return errors.New("the cpu controller is not delegated to the Wasm host's cgroup: CPU limits cannot be enforced")
			}
			return nil
		}
		if err := write("cpu.max", quota+" "+strconv.FormatUint(period, 10)); err != nil {
			return err
		}
		if l.GetCpuShares() > 0 {
			return write("cpu.weight", strconv.FormatUint(sharesToWeight(l.GetCpuShares()), 10))
		}
		return nil
	}
	if _, err := os.Stat(filepath.Join(d, "cpu.cfs_quota_us")); err != nil {
		if l.GetCpuQuota() > 0 {
			return errors.New("no cpu cgroup hierarchy: CPU limits cannot be enforced")
		}
		return nil
	}
	if err := write("cpu.cfs_period_us", strconv.FormatUint(period, 10)); err != nil {
		return err
	}
	quota := int64(-1)
	if l.GetCpuQuota() > 0 {
		quota = l.GetCpuQuota()
	}
	if err := write("cpu.cfs_quota_us", strconv.FormatInt(quota, 10)); err != nil {
		return err
	}
	if l.GetCpuShares() > 0 {
		return write("cpu.shares", strconv.FormatUint(l.GetCpuShares(), 10))
	}
	return nil
}

// sharesToWeight converts cgroup v1 CPU shares to a v2 weight, as the OCI
// runtimes do.
func sharesToWeight(shares uint64) uint64 {
	if shares == 0 {
		return 0
	}
	return 1 + ((shares-2)*9999)/262142
}

// cpuStats reads what the cgroup accounted; it reports whether the cgroup
// accounts CPU time at all.
func (cg *cpuCgroup) cpuStats(s *api.ContainerStats) bool {
	accounted := false
	for _, d := range cg.dirs {
		if b, err := os.ReadFile(filepath.Join(d, "cpu.stat")); err == nil {
			f := fields(string(b))
			if cg.v2 {
				s.CpuUserNanos = f["user_usec"] * 1000
				s.CpuSystemNanos = f["system_usec"] * 1000
				s.CpuThrottledNanos = f["throttled_usec"] * 1000
				accounted = true
			} else {
				s.CpuThrottledNanos = f["throttled_time"]
			}
			s.CpuPeriods, s.CpuThrottledPeriods = f["nr_periods"], f["nr_throttled"]
		}
		if b, err := os.ReadFile(filepath.Join(d, "cpuacct.usage")); err == nil {
			total, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				continue
			}
			// cpuacct.stat splits it, in ticks: scale the split to the
			// nanosecond total.
			user := total
			if b, err := os.ReadFile(filepath.Join(d, "cpuacct.stat")); err == nil {
				f := fields(string(b))
				if ticks := f["user"] + f["system"]; ticks > 0 {
					user = uint64(float64(total) * float64(f["user"]) / float64(ticks))
				}
			}
			s.CpuUserNanos, s.CpuSystemNanos = user, total-user
			accounted = true
		}
	}
	return accounted
}

func fields(content string) map[string]uint64 {
	out := map[string]uint64{}
	for _, line := range strings.Split(content, "\n") {
		f := strings.Fields(line)
		if len(f) == 2 {
			if v, err := strconv.ParseUint(f[1], 10, 64); err == nil {
				out[f[0]] = v
			}
		}
	}
	return out
}

// remove deletes the cgroup once its threads are gone (they leave as their
// goroutines end, shortly after the module does).
func (cg *cpuCgroup) remove() error {
	return RemoveCgroups(cg.dirs)
}

// RemoveCgroups removes cgroups a host made for a container (as its
// ProcessState names them), last first, waiting a little for threads that
// are on their way out. The daemon calls it for the containers of a host
// that is gone: their threads went with it, their cgroups did not. Only
// directories under /sys/fs/cgroup are removed.
func RemoveCgroups(dirs []string) error {
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		dir := filepath.Clean(dirs[i])
		if !strings.HasPrefix(dir, cgroupRoot+"/") {
			errs = append(errs, fmt.Errorf("%s is not a cgroup", dir))
			continue
		}
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("removing cgroup %s: %w", dir, err))
				break
			}
		}
	}
	return errors.Join(errs...)
}
