//go:build pkg

package integration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// pkgEnv is what `make package-test` built: the RPMs of two releases, the
// .debs, and the tree `make install DESTDIR=... PREFIX=/usr` put down.
type pkgEnv struct {
	rpmDir, debDir, tree string
	version              string
	release, next        string
	containerd           string // the containerd release of go.mod, without "v"
}

func pkgEnvFrom(t *testing.T) pkgEnv {
	t.Helper()
	e := pkgEnv{
		rpmDir:  os.Getenv("KUASAR_RPM_DIR"),
		debDir:  os.Getenv("KUASAR_DEB_DIR"),
		tree:    os.Getenv("KUASAR_PKG_TREE"),
		version: os.Getenv("KUASAR_PKG_VERSION"),
		release: os.Getenv("KUASAR_PKG_RELEASE"),
		next:    os.Getenv("KUASAR_PKG_NEXT_RELEASE"),
	}
	if e.rpmDir == "" || e.debDir == "" || e.tree == "" || e.version == "" || e.release == "" || e.next == "" {
		t.Skip("the package test runs from `make package-test` (KUASAR_RPM_DIR and the rest unset)")
	}
	b, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/containerd/containerd/v2\s+v(\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("go.mod does not require containerd")
	}
	e.containerd = string(m[1])
	return e
}

// rpms are the packages of one release, by name (containerd-kuasar,
// containerd-kuasar-vmm, containerd-kuasar-gvisor: those that were built).
func (e pkgEnv) rpms(t *testing.T, release string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, sub := range []string{"", "-vmm", "-gvisor"} {
		name := "containerd-kuasar" + sub
		p := filepath.Join(e.rpmDir, fmt.Sprintf("%s-%s-%s.x86_64.rpm", name, e.version, release))
		if _, err := os.Stat(p); err == nil {
			out[name] = p
		}
	}
	if out["containerd-kuasar"] == "" {
		t.Fatalf("no containerd-kuasar-%s-%s RPM in %s: run make rpm", e.version, release, e.rpmDir)
	}
	return out
}

func paths(m map[string]string) []string {
	var out []string
	for _, k := range sortedKeys(m) {
		out = append(out, m[k])
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// runTool runs a command and returns its standard output; Debian's rpm
// warns on every call that RPM is not Debian's package manager, which is
// dropped from what a failure shows.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), toolStderr(stderr.String()))
	}
	return stdout.String()
}

func toolStderr(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if l != "" && !strings.HasPrefix(l, "rpm: RPM should not be used directly") && !strings.HasPrefix(l, "rpm: However assuming you know") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// pkgFile is one entry of a package or of the install tree.
type pkgFile struct {
	Mode   fs.FileMode // type and permission bits
	Link   string      // symlink target
	Size   int64
	SHA256 string // regular files
	Config bool
}

func (f pkgFile) kind() string {
	switch {
	case f.Mode.IsDir():
		return "directory"
	case f.Mode&fs.ModeSymlink != 0:
		return "symlink"
	}
	return "file"
}

// rpmFiles lists an RPM's entries by path.
func rpmFiles(t *testing.T, rpm string) map[string]pkgFile {
	t.Helper()
	out := map[string]pkgFile{}
	// path size mtime digest mode owner group isconfig isdoc rdev symlink
	for _, line := range strings.Split(strings.TrimSpace(runTool(t, "rpm", "-qp", "--dump", rpm)), "\n") {
		f := strings.Fields(line)
		if len(f) < 11 {
			t.Fatalf("rpm --dump %s: %q", rpm, line)
		}
		var size int64
		var mode uint32
		fmt.Sscan(f[1], &size)
		fmt.Sscanf(f[4], "%o", &mode)
		e := pkgFile{Size: size, Config: f[7] == "1", Mode: unixMode(mode)}
		switch e.kind() {
		case "symlink":
			e.Link = f[10]
		case "file":
			e.SHA256 = f[3]
		}
		if f[5] != "root" || f[6] != "root" {
			t.Errorf("%s: %s is owned by %s:%s", filepath.Base(rpm), f[0], f[5], f[6])
		}
		out[f[0]] = e
	}
	return out
}

// unixMode turns st_mode bits into an fs.FileMode.
func unixMode(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & syscall.S_IFMT {
	case syscall.S_IFDIR:
		mode |= fs.ModeDir
	case syscall.S_IFLNK:
		mode |= fs.ModeSymlink
	}
	return mode
}

// treeFiles lists what is under root, by absolute path inside it.
func treeFiles(t *testing.T, root string) map[string]pkgFile {
	t.Helper()
	out := map[string]pkgFile{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		e := pkgFile{Mode: st.Mode() & (fs.ModeType | fs.ModePerm)}
		switch e.kind() {
		case "symlink":
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
			e.Mode = fs.ModeSymlink | 0o777
		case "file":
			e.Size = st.Size()
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			e.SHA256 = hex.EncodeToString(sum[:])
		}
		out["/"+filepath.ToSlash(strings.TrimPrefix(p, root+"/"))] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// systemDirs belong to the distribution (its filesystem and systemd
// packages), never to ours.
var systemDirs = map[string]bool{
	"/etc": true, "/usr": true, "/usr/bin": true, "/usr/lib": true, "/usr/libexec": true,
	"/usr/share": true, "/usr/share/doc": true, "/usr/share/licenses": true,
	"/usr/lib/systemd": true, "/usr/lib/systemd/system": true,
	"/usr/share/man": true, "/usr/share/man/man5": true, "/usr/share/man/man8": true,
	"/usr/share/bash-completion": true, "/usr/share/bash-completion/completions": true,
	"/usr/share/zsh": true, "/usr/share/zsh/site-functions": true,
}

// debPath is where the .debs put a file of the install tree (mkdeb.sh):
// Debian's zsh reads completions from vendor-completions.
func debPath(path string) string {
	if rest, ok := strings.CutPrefix(path, "/usr/share/zsh/site-functions/"); ok {
		return "/usr/share/zsh/vendor-completions/" + rest
	}
	return path
}

// subPackage is the package a file of the install tree goes to: the rule
// of contrib/deb/mkdeb.sh, which the spec's %files must follow too.
func subPackage(path string) string {
	switch {
	case strings.HasPrefix(path, "/usr/libexec/kuasar"), strings.HasPrefix(path, "/usr/share/kuasar"),
		strings.HasPrefix(path, "/usr/share/doc/containerd-kuasar-vmm"):
		return "containerd-kuasar-vmm"
	case path == "/usr/bin/runsc", strings.HasPrefix(path, "/usr/share/licenses/containerd-kuasar-gvisor"),
		strings.HasPrefix(path, "/usr/share/doc/containerd-kuasar-gvisor"):
		return "containerd-kuasar-gvisor"
	}
	return "containerd-kuasar"
}

// isExecutable: the package's programs, which rpmbuild builds itself
// (stamped with the release), so they are compared by mode only.
func isExecutable(f pkgFile) bool { return f.kind() == "file" && f.Mode&0o111 != 0 }

// TestPackage checks the packages `make rpm` and `make deb` made, then
// runs the node from the RPMs installed in a scratch root: the swap from a
// distribution's containerd, a pod of every handler, and an upgrade to the
// next release with those pods running.
func TestPackage(t *testing.T) {
	e := pkgEnvFrom(t)
	rpms := e.rpms(t, e.release)
	next := e.rpms(t, e.next)
	if len(next) != len(rpms) {
		t.Fatalf("release %s has packages %v, release %s %v", e.release, sortedKeys(rpms), e.next, sortedKeys(next))
	}
	t.Logf("packages: %v", sortedKeys(rpms))

	t.Run("FileList", func(t *testing.T) { testPackageFileList(t, e, rpms) })
	t.Run("Metadata", func(t *testing.T) { testPackageMetadata(t, e, rpms) })
	t.Run("Rpmlint", func(t *testing.T) { testRpmlint(t, rpms) })
	t.Run("DebInstalled", func(t *testing.T) { testDebInstalled(t, e) })
	t.Run("Installed", func(t *testing.T) { testInstalled(t, e, rpms, next) })
}

// The RPMs hold exactly what `make install` puts down, split between the
// packages as the .debs split it, with the same modes and contents (the
// binaries aside: rpmbuild builds its own, stamped with the release); the
// .debs hold the same plus Debian's copyright files.
func testPackageFileList(t *testing.T, e pkgEnv, rpms map[string]string) {
	tree := treeFiles(t, e.tree)
	owner := map[string]string{}
	for _, name := range sortedKeys(rpms) {
		files := rpmFiles(t, rpms[name])
		var list []string
		for path, f := range files {
			list = append(list, path)
			if prev, ok := owner[path]; ok && f.kind() != "directory" {
				t.Errorf("%s is in both %s and %s", path, prev, name)
			}
			owner[path] = name
			want, ok := tree[path]
			switch {
			case !ok:
				t.Errorf("%s: %s is not in the install tree", name, path)
				continue
			case f.kind() != want.kind():
				t.Errorf("%s: %s is a %s, the install tree has a %s", name, path, f.kind(), want.kind())
			case f.Mode != want.Mode:
				t.Errorf("%s: %s has mode %v, the install tree %v", name, path, f.Mode, want.Mode)
			case f.Link != want.Link:
				t.Errorf("%s: %s links to %q, the install tree to %q", name, path, f.Link, want.Link)
			case f.kind() == "file" && !isExecutable(f) && f.SHA256 != want.SHA256:
				t.Errorf("%s: %s differs from the install tree's (%d bytes, tree %d)", name, path, f.Size, want.Size)
			}
			if f.kind() != "directory" && subPackage(path) != name {
				t.Errorf("%s is in %s, the .debs put it in %s", path, name, subPackage(path))
			}
		}
		sort.Strings(list)
		t.Logf("%s: %d entries\n  %s", filepath.Base(rpms[name]), len(list), strings.Join(list, "\n  "))
	}
	for _, path := range sortedKeys(tree) {
		f := tree[path]
		if _, ok := owner[path]; !ok && !(f.kind() == "directory" && systemDirs[path]) {
			if subPackage(path) == "containerd-kuasar-gvisor" || subPackage(path) == "containerd-kuasar-vmm" {
				if _, built := rpms[subPackage(path)]; !built {
					continue // its sub-package is not built
				}
			}
			t.Errorf("make install puts down %s (%s), which no package has", path, f.kind())
		}
	}
	if f := tree["/etc/containerd/config.toml"]; f.kind() != "file" {
		t.Error("make install puts down no /etc/containerd/config.toml")
	}

	// The .debs: made by mkdeb.sh from the same tree.
	debs, _ := filepath.Glob(filepath.Join(e.debDir, "*.deb"))
	if len(debs) == 0 {
		t.Fatalf("no .deb in %s: run make deb", e.debDir)
	}
	seen := map[string]bool{}
	debTree := map[string]string{} // deb path to tree path
	for path := range tree {
		debTree[debPath(path)] = path
	}
	for _, deb := range debs {
		name := runTool(t, "dpkg-deb", "--field", deb, "Package")
		name = strings.TrimSpace(name)
		for _, line := range strings.Split(strings.TrimSpace(runTool(t, "dpkg-deb", "--contents", deb)), "\n") {
			// -rwxr-xr-x root/root 40407632 2026-12-01 23:52 ./usr/bin/x [-> target]
			f := strings.Fields(line)
			if len(f) < 6 {
				t.Fatalf("dpkg-deb --contents %s: %q", deb, line)
			}
			path := strings.TrimSuffix(strings.TrimPrefix(f[5], "."), "/")
			if path == "" || f[0][0] == 'd' {
				continue
			}
			if f[1] != "root/root" {
				t.Errorf("%s: %s is owned by %s", name, path, f[1])
			}
			if path == "/usr/share/doc/"+name+"/copyright" {
				continue
			}
			seen[path] = true
			if _, ok := debTree[path]; !ok {
				t.Errorf("%s: %s is not in the install tree", name, path)
			} else if subPackage(debTree[path]) != name {
				t.Errorf("%s: %s belongs in %s", name, path, subPackage(debTree[path]))
			}
		}
	}
	for _, path := range sortedKeys(tree) {
		if tree[path].kind() != "directory" && !seen[debPath(path)] {
			t.Errorf("make install puts down %s, which no .deb has (as %s)", path, debPath(path))
		}
	}
}

// The package replaces the distribution's containerd, and the
// sub-packages need the main one and what their kind runs on.
func testPackageMetadata(t *testing.T, e pkgEnv, rpms map[string]string) {
	query := func(rpm, what string) []string {
		return strings.Split(strings.TrimSpace(runTool(t, "rpm", "-qp", "--"+what, rpm)), "\n")
	}
	has := func(list []string, want string) bool {
		for _, l := range list {
			if strings.TrimSpace(l) == want {
				return true
			}
		}
		return false
	}
	mainRPM := rpms["containerd-kuasar"]
	for what, wants := range map[string][]string{
		"provides":  {"containerd = " + e.containerd, "containerd.io = " + e.containerd},
		"obsoletes": {"containerd < " + e.containerd, "containerd.io < " + e.containerd},
		"conflicts": {"containerd", "containerd.io"},
		"requires":  {"runc >= 1.1"},
	} {
		got := query(mainRPM, what)
		for _, w := range wants {
			if !has(got, w) {
				t.Errorf("containerd-kuasar %s %v, want %q among them", what, got, w)
			}
		}
	}
	self := fmt.Sprintf("containerd-kuasar(x86-64) = %s-%s", e.version, e.release)
	if p := rpms["containerd-kuasar-vmm"]; p != "" {
		req := query(p, "requires")
		if !has(req, self) {
			t.Errorf("containerd-kuasar-vmm requires %v, want %q", req, self)
		}
		if !strings.Contains(strings.Join(req, "\n"), "qemu") {
			t.Errorf("containerd-kuasar-vmm requires %v: no QEMU", req)
		}
	}
	if p := rpms["containerd-kuasar-gvisor"]; p != "" {
		if req := query(p, "requires"); !has(req, self) {
			t.Errorf("containerd-kuasar-gvisor requires %v, want %q", req, self)
		}
	}
	files := rpmFiles(t, mainRPM)
	if !files["/etc/containerd/config.toml"].Config {
		t.Errorf("/etc/containerd/config.toml is not a %%config file")
	}
	// What containerd's packages ship beside the binaries: the manual
	// pages (rpmlint's check for them is broken in 2.4.0, see
	// contrib/rpm/rpmlint.toml) and ctr's completions.
	for _, f := range []string{
		"/usr/share/man/man8/containerd.8.gz", "/usr/share/man/man8/ctr.8.gz",
		"/usr/share/man/man8/containerd-config.8.gz", "/usr/share/man/man5/containerd-config.toml.5.gz",
		"/usr/share/bash-completion/completions/ctr", "/usr/share/zsh/site-functions/_ctr",
	} {
		if files[f].kind() != "file" || files[f].Size == 0 {
			t.Errorf("containerd-kuasar has no %s", f)
		}
	}
	if flags := runTool(t, "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", mainRPM); !strings.Contains(flags, "/etc/containerd/config.toml cn") {
		t.Errorf("/etc/containerd/config.toml is not %%config(noreplace):\n%s", flags)
	}

	debs, _ := filepath.Glob(filepath.Join(e.debDir, "containerd-kuasar_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("containerd-kuasar .debs in %s: %v", e.debDir, debs)
	}
	control := runTool(t, "dpkg-deb", "--field", debs[0])
	for _, want := range []string{
		"Provides: containerd (= " + e.containerd + "), containerd.io (= " + e.containerd + ")",
		"Conflicts: containerd, containerd.io",
		"Replaces: containerd, containerd.io",
	} {
		if !strings.Contains(control, want+"\n") {
			t.Errorf("containerd-kuasar.deb has no %q:\n%s", want, control)
		}
	}
	if conf := runTool(t, "dpkg-deb", "--ctrl-tarfile", debs[0]); conf == "" {
		t.Error("empty control archive")
	}
	conffiles := runTool(t, "sh", "-c", "dpkg-deb --ctrl-tarfile \"$1\" | tar -xO ./conffiles", "-", debs[0])
	if strings.TrimSpace(conffiles) != "/etc/containerd/config.toml" {
		t.Errorf("containerd-kuasar.deb conffiles %q", conffiles)
	}
}

// rpmlint finds nothing the configuration does not explain in the spec
// and the packages of the release (the next release is a rebuild for the
// upgrade test only: its changelog has no entry of its own).
func testRpmlint(t *testing.T, rpms map[string]string) {
	if _, err := exec.LookPath("rpmlint"); err != nil {
		t.Skip("rpmlint is not installed (make pkg-deps installs Debian's)")
	}
	args := append([]string{"-c", "../contrib/rpm/rpmlint.toml", "../contrib/rpm/containerd-kuasar.spec"}, paths(rpms)...)
	out, err := exec.Command("rpmlint", args...).CombinedOutput()
	t.Logf("rpmlint:\n%s", out)
	if err != nil {
		t.Errorf("rpmlint: %v", err)
	}
	if !regexp.MustCompile(`\b0 errors, 0 warnings\b`).Match(out) {
		t.Error("rpmlint reports errors or warnings: fix them, or filter them in contrib/rpm/rpmlint.toml with the reason")
	}
}

// scratchRoot is a root directory the RPMs are installed into, standing in
// for a node: a shell for the scriptlets, /dev/null, the distribution's
// systemd units (for systemd-analyze), and a systemctl that records what
// the scriptlets ask of it (no systemd runs here).
type scratchRoot struct {
	dir string
}

func newScratchRoot(t *testing.T) *scratchRoot {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "kpkg-root-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept the scratch root %s for inspection", dir)
			return
		}
		os.RemoveAll(dir)
	})
	r := &scratchRoot{dir: dir}
	for _, d := range []string{"bin", "dev", "usr/bin", "usr/lib/systemd/system", "var/lib/rpm"} {
		must(t, os.MkdirAll(filepath.Join(dir, d), 0o755), "scratch root")
	}
	must(t, syscall.Mknod(filepath.Join(dir, "dev/null"), syscall.S_IFCHR|0o666, int((1<<8)|3)), "mknod /dev/null")
	must(t, os.Chmod(filepath.Join(dir, "dev/null"), 0o666), "chmod /dev/null")
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox (Debian's busybox-static, make deps) runs the scriptlets: not found")
	}
	b, err := os.ReadFile(busybox)
	must(t, err, "reading busybox")
	must(t, os.WriteFile(filepath.Join(dir, "bin/sh"), b, 0o755), "scratch root /bin/sh")
	must(t, os.WriteFile(filepath.Join(dir, "usr/bin/systemctl"), []byte("#!/bin/sh\necho \"$*\" >> /systemctl.log\n"), 0o755), "fake systemctl")
	// The distribution's systemd units, as its systemd package puts them.
	if units, err := filepath.Glob("/usr/lib/systemd/system/*"); err == nil {
		for _, u := range units {
			if filepath.Base(u) == "containerd.service" {
				continue
			}
			_ = exec.Command("cp", "-a", u, filepath.Join(dir, "usr/lib/systemd/system/")).Run()
		}
	}
	r.rpm(t, "--initdb")
	return r
}

func (r *scratchRoot) path(p string) string { return filepath.Join(r.dir, p) }

// rpm runs rpm on the scratch root's database.
func (r *scratchRoot) rpm(t *testing.T, args ...string) string {
	t.Helper()
	return runTool(t, "rpm", append([]string{"--root", r.dir, "--dbpath", "/var/lib/rpm"}, args...)...)
}

// verify runs rpm -V on every package: nothing of them changed on disk
// but the operator's config (dependencies aside: the scratch root has no
// libc or runc of its own).
func (r *scratchRoot) verify(t *testing.T, when string) {
	t.Helper()
	out, err := exec.Command("rpm", "--root", r.dir, "--dbpath", "/var/lib/rpm", "-Va", "--nodeps", "--noscripts").CombinedOutput()
	if err == nil {
		return
	}
	for _, l := range strings.Split(toolStderr(string(out)), "\n") {
		if l != "" && !strings.HasSuffix(l, " /etc/containerd/config.toml") {
			t.Errorf("rpm -V %s: %s", when, l)
		}
	}
}

// systemctlLog returns and clears what the scriptlets asked of systemctl.
func (r *scratchRoot) systemctlLog() string {
	b, _ := os.ReadFile(r.path("systemctl.log"))
	os.Remove(r.path("systemctl.log"))
	return string(b)
}

// distroContainerd builds a stand-in for a distribution's containerd
// package (its files at the same paths, a config file the operator edited)
// to swap from.
func distroContainerd(t *testing.T, version string) string {
	t.Helper()
	top := t.TempDir()
	spec := filepath.Join(top, "containerd.spec")
	must(t, os.WriteFile(spec, []byte(`Name: containerd
Version: `+version+`
Release: 1
Summary: Stand-in for a distribution's containerd package
License: Apache-2.0
%global debug_package %{nil}
%global _build_id_links none
%description
The files of a distribution's containerd, at the same paths.
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/etc/containerd %{buildroot}/usr/lib/systemd/system
for b in containerd ctr containerd-shim containerd-shim-runc-v2; do
	printf '#!/bin/sh\necho distribution %s %{version}\n' $b > %{buildroot}/usr/bin/$b
	chmod 0755 %{buildroot}/usr/bin/$b
done
printf 'version = 2\n' > %{buildroot}/etc/containerd/config.toml
printf '[Unit]\nDescription=containerd\n[Service]\nExecStart=/usr/bin/containerd\n' > %{buildroot}/usr/lib/systemd/system/containerd.service
%files
/usr/bin/containerd
/usr/bin/ctr
/usr/bin/containerd-shim
/usr/bin/containerd-shim-runc-v2
%dir /etc/containerd
%config(noreplace) /etc/containerd/config.toml
/usr/lib/systemd/system/containerd.service
`), 0o644), "distribution spec")
	runTool(t, "rpmbuild", "-bb", "--nodeps", "--quiet", "--define", "_topdir "+top, "--target", "x86_64", spec)
	rpm := filepath.Join(top, "RPMS/x86_64/containerd-"+version+"-1.x86_64.rpm")
	if _, err := os.Stat(rpm); err != nil {
		t.Fatalf("the stand-in distribution package: %v", err)
	}
	return rpm
}

func fileSHA(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	must(t, err, "reading %s", p)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// step logs how long a part of the test took.
func step(t *testing.T, what string, f func()) {
	t.Helper()
	start := time.Now()
	f()
	t.Logf("%s: %v", what, time.Since(start).Round(time.Millisecond))
}

func testInstalled(t *testing.T, e pkgEnv, rpms, next map[string]string) {
	var r *scratchRoot
	step(t, "scratch root", func() { r = newScratchRoot(t) })

	// A node with the distribution's containerd, whose operator edited
	// /etc/containerd/config.toml.
	distro := distroContainerd(t, "1.6.20")
	r.rpm(t, "-i", "--nodeps", distro)
	operatorConfig := "# the node operator's configuration\nversion = 2\n"
	must(t, os.WriteFile(r.path("etc/containerd/config.toml"), []byte(operatorConfig), 0o644), "editing the distribution's config")

	// With dependencies checked, the swap is refused only for what the
	// scratch root lacks (a libc, a shell, runc, QEMU): the package does
	// not conflict with the containerd it obsoletes, nor with itself.
	out, err := exec.Command("rpm", append([]string{"--root", r.dir, "--dbpath", "/var/lib/rpm", "-U", "--test"}, paths(rpms)...)...).CombinedOutput()
	if err == nil {
		t.Error("rpm -U --test succeeded in a root without libc or runc")
	}
	lacking := regexp.MustCompile(`^\s+(libc\.so\.6\S*|rtld\(GNU_HASH\)|/bin/sh|runc >= 1\.1|\(/usr/bin/qemu-system-x86_64 or .*\)) is needed by containerd-kuasar`)
	for _, l := range strings.Split(toolStderr(string(out)), "\n") {
		if l != "" && l != "error: Failed dependencies:" && !lacking.MatchString(l) {
			t.Errorf("rpm -U --test: %s", l)
		}
	}

	// The swap: rpm -U takes the distribution's package out (Obsoletes).
	// rpm --nodeps: the scratch root has none of the distribution's
	// libraries or runc (the node's runc, on the host, serves).
	step(t, "rpm -U (from the distribution's containerd)", func() {
		r.rpm(t, append([]string{"-U", "--nodeps"}, paths(rpms)...)...)
	})
	installed := strings.Fields(r.rpm(t, "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\n"))
	sort.Strings(installed)
	t.Logf("installed: %v", installed)
	for name := range rpms {
		if !contains(installed, fmt.Sprintf("%s-%s-%s", name, e.version, e.release)) {
			t.Errorf("%s is not installed: %v", name, installed)
		}
	}
	if contains(installed, "containerd-1.6.20-1") {
		t.Errorf("the distribution's containerd is still installed after the swap: %v", installed)
	}
	// A containerd it does not obsolete (newer) cannot go beside it.
	out, _ = exec.Command("rpm", "--root", r.dir, "--dbpath", "/var/lib/rpm", "-i", "--test", distroContainerd(t, "9.0.0")).CombinedOutput()
	if !strings.Contains(string(out), "conflicts with (installed) containerd-kuasar-") {
		t.Errorf("a newer containerd installs beside containerd-kuasar (no conflict):\n%s", toolStderr(string(out)))
	}
	if log := r.systemctlLog(); !strings.Contains(log, "preset containerd.service") {
		t.Errorf("the first install did not preset containerd.service: systemctl calls %q", log)
	}
	// %config(noreplace): the operator's file stays, ours is beside it.
	if b, _ := os.ReadFile(r.path("etc/containerd/config.toml")); string(b) != operatorConfig {
		t.Errorf("the swap replaced the operator's config.toml:\n%s", b)
	}
	if fileSHA(t, r.path("etc/containerd/config.toml.rpmnew")) != fileSHA(t, "../contrib/config.toml") {
		t.Error("config.toml.rpmnew is not contrib/config.toml")
	}
	if l, err := os.Readlink(r.path("usr/bin/containerd")); err != nil || l != "containerd-kuasar" {
		t.Errorf("/usr/bin/containerd is not containerd-kuasar: %q %v", l, err)
	}
	r.verify(t, "after the swap")

	t.Run("Versions", func(t *testing.T) { testInstalledVersions(t, e, r) })
	t.Run("SystemdUnit", func(t *testing.T) { testInstalledUnit(t, r) })
	if t.Failed() {
		return
	}
	t.Run("Pods", func(t *testing.T) { testInstalledPods(t, e, r, next) })
}

func contains(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

// Every binary of containerd's package is there, from the containerd
// release of go.mod, as is the daemon.
func testInstalledVersions(t *testing.T, e pkgEnv, r *scratchRoot) {
	want := "github.com/containerd/containerd/v2\tv" + e.containerd
	for _, b := range []string{"containerd-kuasar", "ctr", "containerd-shim-runc-v2", "containerd-stress"} {
		out := runTool(t, "go", "version", "-m", r.path("usr/bin/"+b))
		if !strings.Contains(out, "\tmod\t"+want) && !strings.Contains(out, "\tdep\t"+want) {
			t.Errorf("%s is not built from containerd v%s:\n%s", b, e.containerd, out)
		}
	}
	if out := runTool(t, r.path("usr/bin/containerd"), "--version"); !strings.Contains(out, fmt.Sprintf("v%s-%s", e.version, e.release)) || !strings.Contains(out, "v"+e.containerd) {
		t.Errorf("containerd --version: %s", out)
	}
	if out := runTool(t, r.path("usr/bin/ctr"), "--version"); !strings.Contains(out, "v"+e.containerd) {
		t.Errorf("ctr --version: %s", out)
	}
	if out := runTool(t, r.path("usr/bin/containerd-shim-runc-v2"), "-v"); !strings.Contains(out, "v"+e.containerd) {
		t.Errorf("containerd-shim-runc-v2 -v: %s", out)
	}
}

// systemd-analyze verify finds nothing to say about the installed unit
// (it exits 0 on settings it ignores, so any output fails the test).
func testInstalledUnit(t *testing.T, r *scratchRoot) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("SKIP: systemd-analyze is not installed (Debian's systemd package; make pkg-deps installs it)")
	}
	if _, err := os.Stat(r.path("usr/lib/systemd/system/sysinit.target")); err != nil {
		t.Skip("SKIP: this host has no systemd units (/usr/lib/systemd/system/sysinit.target) for systemd-analyze to verify against")
	}
	out, err := exec.Command("systemd-analyze", "verify", "--root="+r.dir, "containerd.service").CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify containerd.service: %v\n%s", err, out)
	}
	t.Logf("systemd-analyze verify --root=%s containerd.service: clean", r.dir)
}

// pkgHandler is a runtime handler the package test runs a pod of.
type pkgHandler struct {
	name       string
	controller string // sandbox controller plugin ID ("" for CRI's podsandbox)
	wasm       bool
}

var pkgHandlers = []pkgHandler{
	{name: stockRunc},
	{name: kuasarRunc, controller: "kuasar-runc"},
	{name: kuasarWasm, controller: "kuasar-wasm", wasm: true},
	{name: "kuasar-vmm", controller: "kuasar-vmm"},
	{name: "kuasar-gvisor", controller: "kuasar-appkernel"},
}

// pkgPod is a pod of one handler with a container that logs a line every
// 200 ms.
type pkgPod struct {
	h      pkgHandler
	id     string
	cfg    *runtimeapi.PodSandboxConfig
	ticker string
}

// controllers reads the sandbox controllers the daemon loaded, through the
// installed ctr: ID to "ok", or the reason it was skipped.
func controllers(t *testing.T, r *scratchRoot, d *Daemon) map[string]string {
	t.Helper()
	out := runTool(t, r.path("usr/bin/ctr"), "--address", d.Addr, "plugins", "ls", "--detailed")
	// Blocks of "Key: value" lines, one per plugin; a plugin that did not
	// load has an Error with its Code and Message.
	status := map[string]string{}
	var typ, id, errText string
	flush := func() {
		if typ == "io.containerd.sandbox.controller.v1" && id != "" {
			status[id] = "ok"
			if errText != "" {
				status[id] = errText
			}
		}
		typ, id, errText = "", "", ""
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok {
			continue
		}
		switch v = strings.TrimSpace(v); k {
		case "Type":
			flush()
			typ = v
		case "ID":
			id = v
		case "Code", "Message":
			errText = strings.TrimSpace(errText + " " + v)
		}
	}
	flush()
	if len(status) == 0 {
		t.Fatalf("ctr plugins ls lists no sandbox controller:\n%s", out)
	}
	return status
}

func (p *pkgPod) container(name string) *runtimeapi.ContainerConfig {
	if p.h.wasm {
		return wasmConfig(name, images.WasmLayer, "tick")
	}
	return ctrConfig(name, "sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done")
}

func (p *pkgPod) tick() string {
	if p.h.wasm {
		return "tick 2"
	}
	return "tick-2"
}

// logLineCount counts a container's log lines.
func logLineCount(t *testing.T, d *Daemon, id string) int {
	t.Helper()
	b, _ := os.ReadFile(d.logPath(t, id))
	return bytes.Count(b, []byte("\n"))
}

// waitMoreLines waits for a container to log n more lines.
func waitMoreLines(t *testing.T, d *Daemon, id string, n int, what string) {
	t.Helper()
	before := logLineCount(t, d, id)
	deadline := time.Now().Add(30 * time.Second)
	for logLineCount(t, d, id) < before+n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the container's log stopped at %d lines", what, logLineCount(t, d, id))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// helperProcs are the processes serving the daemon's pods: those running
// a program of the installed tree (keeper, Wasm host, shims, runsc) or
// naming the daemon's root (QEMU), the daemon aside.
func helperProcs(r *scratchRoot, d *Daemon) map[int]string {
	out := map[int]string{}
	daemon := 0
	if d.cmd != nil && d.cmd.Process != nil {
		daemon = d.cmd.Process.Pid
	}
	for _, p := range allProcs() {
		if p.Pid == daemon || p.Pid == os.Getpid() {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", p.Pid))
		if strings.HasPrefix(exe, r.dir+"/") || strings.Contains(p.Cmdline, d.Dir+"/") {
			out[p.Pid] = exe
		}
	}
	return out
}

// The daemon runs from the installed tree, with the installed config (as
// the operator adapts it: the scratch daemon's paths), finds its helpers
// and containerd's shim beside itself, and runs a pod of every handler it
// has; an upgrade to the next release, the way the unit restarts the
// daemon (KillMode=process: the main process only), keeps them running.
func testInstalledPods(t *testing.T, e pkgEnv, r *scratchRoot, next map[string]string) {
	config := r.path("etc/containerd/config.toml")
	var operatorSHA string
	d := startDaemon(t, daemonOptions{
		binary: r.path("usr/bin/containerd"),
		// systemd's default PATH for services: nothing of ours on it, so
		// the daemon must find its helpers beside itself.
		path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		configure: func(t *testing.T, d *Daemon) {
			// The operator takes the package's configuration
			// (config.toml.rpmnew) and points it at this node's paths:
			// the scratch daemon's, and cgroupfs (no systemd here).
			must(t, os.Rename(config+".rpmnew", config), "taking config.toml.rpmnew")
			b := mergedConfig(t, config, d.Config)
			must(t, os.WriteFile(config, b, 0o644), "writing %s", config)
			d.Config = config
			operatorSHA = fileSHA(t, config)
		},
	})
	t.Logf("daemon %s --config %s (pid %d)", d.Binary, d.Config, d.cmd.Process.Pid)

	// The handlers CRI serves, and the controllers the daemon loaded.
	st, err := d.RS.Status(ctx(t), &runtimeapi.StatusRequest{})
	must(t, err, "CRI status")
	configured := map[string]bool{}
	for _, h := range st.RuntimeHandlers {
		if h.Name != "" {
			configured[h.Name] = true
		}
	}
	loaded := controllers(t, r, d)
	t.Logf("CRI runtime handlers %v; sandbox controllers %v", sortedKeys(configured), loaded)
	known := map[string]bool{}
	var pods []*pkgPod
	for _, h := range pkgHandlers {
		known[h.name] = true
		if !configured[h.name] {
			t.Logf("%s: not a runtime handler of this build", h.name)
			continue
		}
		if h.controller != "" && loaded[h.controller] != "ok" {
			reason := loaded[h.controller]
			if reason == "" {
				reason = "no such controller"
			}
			// A kind whose sub-package is installed must run.
			if _, ok := next["containerd-kuasar-"+strings.TrimPrefix(h.name, "kuasar-")]; ok {
				t.Errorf("%s: its sub-package is installed, but the controller is not available: %s", h.name, reason)
			} else {
				t.Logf("SKIP %s: the controller is not available here: %s", h.name, reason)
			}
			continue
		}
		pods = append(pods, &pkgPod{h: h})
	}
	for name := range configured {
		if !known[name] {
			t.Errorf("CRI serves handler %s, which the package test runs no pod of", name)
		}
	}
	if t.Failed() {
		return
	}
	d.pull(t, images.WasmLayer)
	for _, p := range pods {
		step(t, p.h.name+" pod and container", func() {
			p.cfg = d.podConfig("pkg-" + strings.ReplaceAll(p.h.name, "-", ""))
			p.id = d.runPod(t, p.h.name, p.cfg)
			p.ticker = d.run(t, p.id, p.cfg, p.container("ticker"))
			d.waitLog(t, p.ticker, p.tick(), 60*time.Second)
		})
	}
	t.Logf("crictl pods:\n%s", d.crictlOut(t, "pods"))
	helpers := helperProcs(r, d)
	t.Logf("processes serving the pods: %v", helpers)
	repo, err := filepath.Abs("..")
	must(t, err, "the tree's path")
	for pid, exe := range helpers {
		if strings.HasPrefix(exe, r.dir+"/") {
			continue
		}
		// Anything else serving the pods runs a program of the host's
		// own packages (QEMU), never one of the build tree.
		if strings.HasPrefix(exe, repo+"/") || strings.HasPrefix(exe, binDir+"/") || (stockBinDir != "" && strings.HasPrefix(exe, stockBinDir+"/")) {
			t.Errorf("process %d serving the pods runs %s, not a program of the installed tree", pid, exe)
		}
	}
	for _, want := range []string{"kuasar-keeper", "containerd-shim-runc-v2"} {
		found := false
		for _, exe := range helpers {
			found = found || exe == r.path("usr/bin/"+want)
		}
		if !found {
			t.Errorf("no %s of the installed tree serves the pods: %v", want, helpers)
		}
	}

	// The upgrade: rpm -U to the next release under the running daemon.
	daemonPid := d.cmd.Process.Pid
	r.systemctlLog()
	step(t, "rpm -U (to the next release)", func() {
		r.rpm(t, append([]string{"-U", "--nodeps"}, paths(next)...)...)
	})
	installed := r.rpm(t, "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\n")
	for name := range next {
		if !strings.Contains(installed, fmt.Sprintf("%s-%s-%s\n", name, e.version, e.next)) {
			t.Errorf("%s-%s-%s is not installed after the upgrade:\n%s", name, e.version, e.next, installed)
		}
	}
	if fileSHA(t, config) != operatorSHA {
		t.Fatal("the upgrade replaced the operator's /etc/containerd/config.toml")
	}
	if _, err := os.Stat(config + ".rpmnew"); err == nil {
		t.Error("the upgrade wrote a config.toml.rpmnew: the package's config did not change")
	}
	r.verify(t, "after the upgrade")
	// %postun of the old release asks systemd to restart the service.
	calls := r.systemctlLog()
	if !strings.Contains(calls, "try-restart containerd.service") {
		t.Fatalf("the upgrade did not restart containerd.service: systemctl calls %q", calls)
	}
	t.Logf("the upgrade's systemctl calls: %q", calls)
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", daemonPid)); !strings.HasSuffix(exe, " (deleted)") {
		t.Errorf("the running daemon's binary was not replaced: %s", exe)
	}
	for _, p := range pods {
		if st := d.podState(t, p.id); st != runtimeapi.PodSandboxState_SANDBOX_READY {
			t.Errorf("%s pod %v after rpm -U", p.h.name, st)
		}
	}

	// systemctl try-restart with KillMode=process: SIGTERM to the main
	// process, then ExecStart again (the new binary).
	step(t, "daemon restart (KillMode=process)", func() {
		d.kill(syscall.SIGTERM)
		for pid, exe := range helpers {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
				t.Errorf("%s (%d) did not outlive the daemon's stop", exe, pid)
			}
		}
		d.start()
	})
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", d.cmd.Process.Pid)); exe != r.path("usr/bin/containerd-kuasar") {
		t.Errorf("the restarted daemon runs %q", exe)
	}
	if out := runTool(t, d.Binary, "--version"); !strings.Contains(out, fmt.Sprintf("v%s-%s", e.version, e.next)) {
		t.Errorf("after the upgrade, containerd --version: %s", out)
	}
	for _, p := range pods {
		step(t, p.h.name+" pod after the upgrade", func() {
			if st := d.podState(t, p.id); st != runtimeapi.PodSandboxState_SANDBOX_READY {
				t.Fatalf("%s pod %v after the upgrade", p.h.name, st)
			}
			if st := d.status(t, p.ticker); st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
				t.Fatalf("%s container %v after the upgrade", p.h.name, st.State)
			}
			waitMoreLines(t, d, p.ticker, 3, p.h.name+" after the upgrade")
			if !p.h.wasm {
				if out, _, code := d.execSync(t, p.ticker, "echo", "upgraded"); code != 0 || out != "upgraded\n" {
					t.Errorf("%s: exec after the upgrade: %q %d", p.h.name, out, code)
				}
			}
			// A new container in the same pod, served by the new daemon.
			c := d.run(t, p.id, p.cfg, p.container("after"))
			d.waitLog(t, c, p.tick(), 60*time.Second)
			d.stopRemove(t, c, 0)
		})
	}
	for pid, exe := range helpers {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			t.Errorf("%s (%d) was restarted by the upgrade", exe, pid)
		}
	}
	t.Logf("crictl ps after the upgrade:\n%s", d.crictlOut(t, "ps"))
	for _, p := range pods {
		step(t, p.h.name+" pod removed", func() { d.removePod(t, p.id) })
	}
}

// mergedConfig is the installed config with the scratch daemon's settings
// laid over it (paths, sockets, registry mirrors, CNI), and the runc
// handler on cgroupfs: this machine runs no systemd.
func mergedConfig(t *testing.T, installed, scratch string) []byte {
	t.Helper()
	load := func(p string) map[string]any {
		b, err := os.ReadFile(p)
		must(t, err, "reading %s", p)
		m := map[string]any{}
		must(t, toml.Unmarshal(b, &m), "parsing %s", p)
		return m
	}
	base, over := load(installed), load(scratch)
	mergeMaps(base, over)
	runc := dig(t, base, "plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes", "runc", "options")
	runc["SystemdCgroup"] = false
	b, err := toml.Marshal(base)
	must(t, err, "encoding the config")
	return append([]byte("# The package's config.toml, with the paths of the package test's daemon.\n"), b...)
}

// mergeMaps lays over onto base, table by table.
func mergeMaps(base, over map[string]any) {
	for k, v := range over {
		if bm, ok := base[k].(map[string]any); ok {
			if om, ok := v.(map[string]any); ok {
				mergeMaps(bm, om)
				continue
			}
		}
		base[k] = v
	}
}

func dig(t *testing.T, m map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		next, ok := m[k].(map[string]any)
		if !ok {
			t.Fatalf("the installed config has no table %s", strings.Join(keys, "."))
		}
		m = next
	}
	return m
}

// debRoot is a root directory for dpkg --root, laid out as Debian 12 and
// later are (merged /usr: /bin, /sbin and /lib link into /usr), with an
// empty package database and a shell for the maintainer scripts.
func debRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "kpkg-deb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(dir)
		}
	})
	for _, d := range []string{"dev", "usr/bin", "usr/sbin", "usr/lib", "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"} {
		must(t, os.MkdirAll(filepath.Join(dir, d), 0o755), "deb root")
	}
	for _, l := range []string{"bin", "sbin", "lib"} {
		must(t, os.Symlink("usr/"+l, filepath.Join(dir, l)), "deb root")
	}
	for _, f := range []string{"var/lib/dpkg/status", "var/lib/dpkg/available"} {
		must(t, os.WriteFile(filepath.Join(dir, f), nil, 0o644), "deb root")
	}
	must(t, syscall.Mknod(filepath.Join(dir, "dev/null"), syscall.S_IFCHR|0o666, int((1<<8)|3)), "mknod /dev/null")
	must(t, os.Chmod(filepath.Join(dir, "dev/null"), 0o666), "chmod /dev/null")
	busybox, err := exec.LookPath("busybox")
	must(t, err, "busybox (Debian's busybox-static, make deps) runs the maintainer scripts")
	b, err := os.ReadFile(busybox)
	must(t, err, "reading busybox")
	must(t, os.WriteFile(filepath.Join(dir, "usr/bin/sh"), b, 0o755), "deb root /bin/sh")
	// The essential commands the maintainer scripts use, as busybox
	// applets.
	for _, c := range []string{"cat", "chmod", "mkdir", "rm"} {
		must(t, os.Symlink("sh", filepath.Join(dir, "usr/bin", c)), "deb root /bin/%s", c)
	}
	return dir
}

// distroContainerdDeb builds a stand-in for Debian 12's containerd
// package: its files at the same paths (the unit in /lib, as debhelper put
// it then), config.toml a conffile.
func distroContainerdDeb(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "containerd")
	for _, d := range []string{"DEBIAN", "usr/bin", "etc/containerd", "lib/systemd/system"} {
		must(t, os.MkdirAll(filepath.Join(root, d), 0o755), "stand-in deb")
	}
	for _, b := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		must(t, os.WriteFile(filepath.Join(root, "usr/bin", b), []byte("#!/bin/sh\necho distribution "+b+"\n"), 0o755), "stand-in deb")
	}
	must(t, os.WriteFile(filepath.Join(root, "etc/containerd/config.toml"), []byte("version = 2\n"), 0o644), "stand-in deb")
	must(t, os.WriteFile(filepath.Join(root, "lib/systemd/system/containerd.service"), []byte("[Service]\nExecStart=/usr/bin/containerd\n"), 0o644), "stand-in deb")
	must(t, os.WriteFile(filepath.Join(root, "DEBIAN/conffiles"), []byte("/etc/containerd/config.toml\n"), 0o644), "stand-in deb")
	must(t, os.WriteFile(filepath.Join(root, "DEBIAN/control"), []byte(`Package: containerd
Version: 1.6.20~ds1-1
Architecture: amd64
Maintainer: Stand-in <stand-in@example.invalid>
Description: stand-in for Debian's containerd
 The files of Debian's containerd, at the same paths.
`), 0o644), "stand-in deb")
	deb := root + ".deb"
	runTool(t, "dpkg-deb", "--root-owner-group", "--build", root, deb)
	return deb
}

// The .debs install with dpkg over Debian's containerd (Conflicts and
// Replaces take it out), keep the operator's config.toml, and install
// what the tree holds. The unit survives the removal of Debian's, which
// ships it as /lib/systemd/system/containerd.service: on merged /usr the
// same file (the postinst puts it back).
func testDebInstalled(t *testing.T, e pkgEnv) {
	debs, _ := filepath.Glob(filepath.Join(e.debDir, "*.deb"))
	root := debRoot(t)
	dpkg := func(args ...string) string {
		t.Helper()
		return runTool(t, "dpkg", append([]string{"--root=" + root}, args...)...)
	}
	dpkg("-i", distroContainerdDeb(t))
	operatorConfig := "# the node operator's configuration\nversion = 2\n"
	must(t, os.WriteFile(filepath.Join(root, "etc/containerd/config.toml"), []byte(operatorConfig), 0o644), "editing the distribution's config")
	// --force-depends: the root has no libc, runc or QEMU packages;
	// --force-confold: what apt's Dpkg::Options give a non-interactive
	// upgrade (dpkg would ask about the edited conffile).
	var out string
	step(t, "dpkg -i (over Debian's containerd)", func() {
		out = dpkg(append([]string{"--force-depends", "--force-confold", "-i"}, debs...)...)
	})
	status := dpkg("-l")
	for _, want := range []string{"ii  containerd-kuasar ", "ii  containerd-kuasar-vmm "} {
		if strings.Contains(strings.Join(debs, " "), strings.TrimSpace(strings.TrimPrefix(want, "ii  "))+"_") && !strings.Contains(status, want) {
			t.Errorf("not installed (%q):\n%s\n%s", want, status, out)
		}
	}
	if strings.Contains(status, "ii  containerd ") {
		t.Errorf("Debian's containerd is still installed beside containerd-kuasar:\n%s", status)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/containerd/config.toml")); string(b) != operatorConfig {
		t.Errorf("dpkg replaced the operator's config.toml:\n%s", b)
	}
	if l, err := os.Readlink(filepath.Join(root, "usr/bin/containerd")); err != nil || l != "containerd-kuasar" {
		t.Errorf("/usr/bin/containerd is not containerd-kuasar: %q %v", l, err)
	}
	// Every file of the tree is installed, unchanged.
	tree, installed := treeFiles(t, e.tree), treeFiles(t, root)
	listed := map[string]bool{}
	for _, p := range []string{"containerd-kuasar", "containerd-kuasar-vmm", "containerd-kuasar-gvisor"} {
		if !strings.Contains(status, "ii  "+p+" ") {
			continue
		}
		for _, f := range strings.Split(strings.TrimSpace(dpkg("-L", p)), "\n") {
			listed[f] = true
		}
	}
	for _, path := range sortedKeys(tree) {
		want := tree[path]
		if want.kind() == "directory" {
			continue
		}
		if !listed[debPath(path)] {
			t.Errorf("%s is not installed by the .debs (as %s)", path, debPath(path))
			continue
		}
		if path == "/etc/containerd/config.toml" {
			continue
		}
		got := installed[debPath(path)]
		if got.kind() != want.kind() || got.Mode != want.Mode || got.SHA256 != want.SHA256 || got.Link != want.Link {
			t.Errorf("installed %s differs from the tree's", path)
		}
	}
	// dpkg --verify: nothing changed but the operator's conffile.
	v, _ := exec.Command("dpkg", "--root="+root, "--verify").CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(v)), "\n") {
		if l != "" && !strings.HasSuffix(l, " c /etc/containerd/config.toml") {
			t.Errorf("dpkg --verify: %s", l)
		}
	}
	t.Logf("dpkg -l:\n%s", status)
}
