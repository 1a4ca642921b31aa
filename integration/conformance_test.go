//go:build conformance

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// conformanceSkips are the specs this host cannot run for either handler,
// with the reason; the README's Conformance section lists the same.
var conformanceSkips = []struct{ spec, reason string }{
	{"AppArmor", "AppArmor is not enabled on the host"},
	{"UserNamespaces", "critest runs them only on a handler that reports user namespace support, which needs idmapped mounts from runc 1.2 or later; Debian 12's runc is 1.1.5"},
	{"public image with digest should be pulled and removed", "the image is pinned by a digest of the original registry, which no local build can reproduce"},
}

// vmmSkips are specs that cannot apply to a pod in a VM, with the reason;
// the README lists the same.
var vmmSkips = []struct{ spec, reason string }{
	{"HostNetwork is true", "a VM cannot share the node's network namespace (refused with InvalidArgument)"},
	{"HostIpc is true", "a VM cannot share the node's IPC namespace (refused with InvalidArgument)"},
	{"should support HostPID", "a VM cannot share the node's PID namespace (refused with InvalidArgument)"},
	{"portforward in host network", "needs a pod on the node's network"},
	{"mount with 'rshared' should support propagation from host to container and vice versa", "mounts do not propagate across the VM boundary (9p share)"},
	{"mount with 'rslave' should support propagation from host to container", "mounts do not propagate across the VM boundary (9p share)"},
}

// TestConformance runs critest's CRI validation suite against stock
// containerd's runc handler (podsandbox) as the reference, then against
// containerd-kuasar's kuasar-runc and kuasar-vmm. Every spec that passes on
// stock must pass on each of them, but the specs that cannot apply to a VM
// (vmmSkips) on kuasar-vmm. kuasar-gvisor is compared with gVisor's own
// shim on stock containerd (conformanceGVisor).
func TestConformance(t *testing.T) {
	out := os.Getenv("KUASAR_CONFORMANCE_OUT")
	if out == "" {
		out = t.TempDir()
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	old, _ := filepath.Glob(filepath.Join(out, "critest-*"))
	for _, f := range old {
		os.Remove(f)
	}
	if err := images.PushSet(context.Background(), registry, images.CritestBuilders); err != nil {
		t.Fatalf("critest images: %v", err)
	}
	runs := []*handlerRun{
		{name: kuasarRunc, handler: kuasarRunc},
		{name: kuasarVMM, handler: kuasarVMM, skips: vmmSkips},
	}
	selected := func(string) bool { return true }
	if h := os.Getenv("KUASAR_CONFORMANCE_HANDLERS"); h != "" {
		selected = func(name string) bool { return strings.Contains(","+h+",", ","+name+",") }
	}
	runs = slices.DeleteFunc(runs, func(r *handlerRun) bool { return !selected(r.name) })
	// One daemon at a time: each is stopped, and checked for leaks, at the
	// end of its subtest.
	var stockRes map[string]specResult
	t.Run("stock-runc", func(t *testing.T) {
		d := startDaemon(t, daemonOptions{stock: true, portMap: true})
		stockRes = critest(t, d, "", nil, filepath.Join(out, "critest-stock.json"), nil)
	})
	for _, r := range runs {
		t.Run(r.name, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{portMap: true})
			r.res = critest(t, d, r.handler, r.skips, filepath.Join(out, "critest-"+r.name+".json"), stockRes)
		})
	}
	if stockRes == nil {
		t.Fatal("the stock critest run produced no results")
	}
	for _, r := range runs {
		if r.res == nil {
			t.Fatalf("the %s critest run produced no results", r.name)
		}
	}

	table, regressions, counts := compare(stockRes, runs)
	var names []string
	for _, r := range runs {
		names = append(names, "`"+r.name+"`")
	}
	md := fmt.Sprintf("### critest v1.34.0: stock containerd `runc` vs containerd-kuasar %s (%s)\n\n%s\n%s",
		strings.Join(names, ", "), time.Now().UTC().Format(time.RFC3339), counts, table)
	if err := os.WriteFile(filepath.Join(out, "conformance.md"), []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + md)
	for _, r := range regressions {
		t.Errorf("passes on stock, not on %s: %s\n%s", r.handler, r.spec, r.failure)
	}
	if selected(kuasarGVisor) {
		t.Run("gvisor", func(t *testing.T) { conformanceGVisor(t, out, stockRes) })
	}
	// A spec that fails on stock is not compared: that is a problem of the
	// host, the harness or a stand-in image, to be fixed or skipped.
	for name, r := range stockRes {
		if r.State != "passed" && r.State != "skipped" {
			t.Errorf("fails on stock too, so it is not compared (fix the stand-in or skip it with a reason): %s\n%s", name, r.Failure)
		}
	}
}

// handlerRun is one handler's critest run.
type handlerRun struct {
	name, handler string
	// skips are specs that cannot apply to the handler, with the reason.
	skips []struct{ spec, reason string }
	res   map[string]specResult
}

// skipped reports whether spec is one the handler cannot run.
func (r *handlerRun) skipped(spec string) bool {
	for _, s := range r.skips {
		if strings.Contains(spec, s.spec) {
			return true
		}
	}
	return false
}

// specResult is one spec's outcome in a critest run.
type specResult struct {
	State   string
	Failure string
	Leaf    string // the spec's own text, for -ginkgo.focus
	Retried bool   // failed once, then passed when run again
}

// critest runs the validation suite against d and returns results by spec.
// Specs that fail are run once more, alone, those that passed on the
// reference run ref (all of them without one): one that passes then counts
// as passed, marked as retried in the table.
func critest(t *testing.T, d *Daemon, handler string, skips []struct{ spec, reason string }, report string, ref map[string]specResult) map[string]specResult {
	t.Helper()
	var extra []string
	for _, s := range skips {
		extra = append(extra, "-ginkgo.skip", regexp.QuoteMeta(s.spec))
	}
	res := runCritest(t, d, handler, report, extra)
	var focus []string
	for name, r := range res {
		if r.State != "passed" && r.State != "skipped" && (ref == nil || ref[name].State == "passed") {
			focus = append(focus, "-ginkgo.focus", regexp.QuoteMeta(r.Leaf))
		}
	}
	if len(focus) == 0 {
		return res
	}
	again := runCritest(t, d, handler, strings.TrimSuffix(report, ".json")+"-retry.json", append(extra, focus...))
	for name, r := range again {
		if first, ok := res[name]; ok && first.State != "passed" && r.State == "passed" {
			res[name] = specResult{State: "passed", Leaf: r.Leaf, Retried: true}
		}
	}
	return res
}

// critestParallel is how many specs run at once: KUASAR_CRITEST_PARALLEL,
// else 2 (most of a spec is waiting on the runtime).
func critestParallel() int {
	if n, err := strconv.Atoi(os.Getenv("KUASAR_CRITEST_PARALLEL")); err == nil && n > 0 {
		return n
	}
	return 2
}

// runCritest runs critest once and reads its report.
func runCritest(t *testing.T, d *Daemon, handler, report string, extra []string) map[string]specResult {
	t.Helper()
	args := []string{
		"-runtime-endpoint", "unix://" + d.Addr,
		"-image-endpoint", "unix://" + d.Addr,
		"-ginkgo.json-report", report,
		"-ginkgo.no-color",
	}
	for _, s := range conformanceSkips {
		args = append(args, "-ginkgo.skip", regexp.QuoteMeta(s.spec))
	}
	if handler != "" {
		args = append(args, "-runtime-handler", handler)
	}
	// Specs run on critestParallel ginkgo nodes (ginkgo's CLI, a pinned
	// tool); those that fail are run again alone.
	if n := critestParallel(); n > 1 && !strings.Contains(strings.Join(extra, " "), "-ginkgo.focus") {
		args = append(args, "-parallel", strconv.Itoa(n))
	}
	args = append(args, extra...)
	cmd := exec.Command(filepath.Join(binDir, "critest"), args...)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "PATH="+binDir+":"+os.Getenv("PATH"))
	logf, err := os.Create(strings.TrimSuffix(report, ".json") + ".log")
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	shmBefore := shmSegments()
	defer removeNewShm(t, shmBefore)
	begin := time.Now()
	runErr := cmd.Run() // non-zero when any spec fails; the report says which
	what := "the suite"
	if n := strings.Count(strings.Join(extra, " "), "-ginkgo.focus"); n > 0 {
		what = fmt.Sprintf("%d failed specs again", n)
	}
	t.Logf("critest, %s, against %s (handler %q): %v in %v", what, filepath.Base(d.Binary), handler, runErr, time.Since(begin).Round(time.Second))
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("no critest report (%v); see %s", err, logf.Name())
	}
	var suites []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
			Failure                 struct {
				Message string
			}
		}
	}
	if err := json.Unmarshal(b, &suites); err != nil {
		t.Fatalf("decoding critest report: %v", err)
	}
	res := map[string]specResult{}
	for _, s := range suites {
		for _, r := range s.SpecReports {
			if r.LeafNodeType != "It" {
				continue
			}
			name := strings.Join(append(r.ContainerHierarchyTexts, r.LeafNodeText), " ")
			res[name] = specResult{State: r.State, Failure: firstLines(r.Failure.Message, 4), Leaf: r.LeafNodeText}
		}
	}
	if len(res) == 0 {
		t.Fatalf("critest ran no specs; see %s", logf.Name())
	}
	return res
}

// result is the state as the table shows it.
func (r specResult) result() string {
	if r.Retried {
		return r.State + " (on retry)"
	}
	return r.State
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

// regression is a spec that passes on stock and not on a handler.
type regression struct{ handler, spec, failure string }

// compare builds the side-by-side table and lists specs that pass on stock
// but not on a handler (leaving out those the handler cannot run).
func compare(stock map[string]specResult, runs []*handlerRun) (table string, regressions []regression, counts string) {
	names := map[string]bool{}
	for n := range stock {
		names[n] = true
	}
	for _, r := range runs {
		for n := range r.res {
			names[n] = true
		}
	}
	var sorted []string
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	count := func(res map[string]specResult) string {
		var passed, failed, skipped, retried int
		for _, r := range res {
			switch r.State {
			case "passed":
				passed++
			case "skipped":
				skipped++
			default: // failed, panicked, timedout, interrupted...
				failed++
			}
			if r.Retried {
				retried++
			}
		}
		out := fmt.Sprintf("%d passed, %d failed, %d skipped", passed, failed, skipped)
		if retried > 0 {
			out += fmt.Sprintf(" (%d passed only on retry)", retried)
		}
		return out
	}
	var b strings.Builder
	b.WriteString("| spec | stock `runc` |")
	for _, r := range runs {
		fmt.Fprintf(&b, " `%s` |", r.name)
	}
	b.WriteString("\n|---|---|" + strings.Repeat("---|", len(runs)) + "\n")
	for _, n := range sorted {
		s := stock[n].result()
		if s == "" {
			s = "absent"
		}
		fmt.Fprintf(&b, "| %s | %s |", strings.ReplaceAll(n, "|", "\\|"), s)
		for _, r := range runs {
			k := r.res[n].result()
			switch {
			case r.skipped(n):
				k += " (cannot apply)"
			case k == "":
				k = "absent"
			case stock[n].State == "passed" && r.res[n].State != "passed":
				regressions = append(regressions, regression{r.name, n, r.res[n].Failure})
				k += " **REGRESSION**"
			}
			fmt.Fprintf(&b, " %s |", k)
		}
		b.WriteString("\n")
	}
	counts = fmt.Sprintf("Stock: %s.", count(stock))
	for _, r := range runs {
		var lost int
		for _, g := range regressions {
			if g.handler == r.name {
				lost++
			}
		}
		counts += fmt.Sprintf(" %s: %s (%d specs that cannot apply skipped); passing on stock and not on %s: %d.", r.name, count(r.res), len(r.skips), r.name, lost)
	}
	return b.String(), regressions, counts + "\n"
}

// shmSegments lists the host's System V shared memory segments: id and
// number of attached processes.
func shmSegments() map[int]int {
	out := map[int]int{}
	b, err := os.ReadFile("/proc/sysvipc/shm")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 7 {
			continue
		}
		id, err1 := strconv.Atoi(f[1])
		nattch, err2 := strconv.Atoi(f[6])
		if err1 == nil && err2 == nil {
			out[id] = nattch
		}
	}
	return out
}

// removeNewShm removes the unattached segments that appeared since before:
// critest's HostIpc specs create one on the host (ipcmk) and leave it.
func removeNewShm(t *testing.T, before map[int]int) {
	for id, nattch := range shmSegments() {
		if _, ok := before[id]; ok || nattch != 0 {
			continue
		}
		if _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Logf("removing shared memory segment %d: %v", id, err)
		}
	}
}
