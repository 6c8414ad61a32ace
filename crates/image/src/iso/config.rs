//! The boot loader configurations an ISO may carry and the kernel entries read from them: GRUB
//! (`linux`/`linuxefi`/`linux16` inside a `menuentry`), syslinux/isolinux (`LABEL` blocks with
//! `KERNEL`/`LINUX` and `APPEND`, keywords in any case) and systemd-boot loader entries (`title`,
//! `linux`, `options`). Pure text parsing: nothing is resolved (GRUB variables stay as written).

/// One boot loader configuration file found in an ISO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Its path inside the ISO, as the ISO names it (Rock Ridge or Joliet names when present),
    /// e.g. `/boot/grub/grub.cfg`.
    pub path: String,
    pub entries: Vec<KernelEntry>,
}

/// A kernel the boot loader can start, with its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// GRUB's `menuentry` title, syslinux's `MENU LABEL` (else its `LABEL`), a loader entry's `title`.
    pub title: Option<String>,
    /// The kernel's path as written (syslinux resolves a relative one against the config's directory).
    pub kernel: String,
    /// The kernel command line as written (GRUB variables unexpanded).
    pub cmdline: String,
    /// The 1-based line of the command line in the file: GRUB's `linux` line, syslinux's `APPEND`,
    /// a loader entry's `options` (the kernel's line when there is none): where `console=` goes.
    pub line: usize,
}

impl KernelEntry {
    /// Whether the command line has `console=<tty>`, bare or with options (`console=ttyS0,115200n8`).
    pub fn has_console(&self, tty: &str) -> bool {
        self.cmdline
            .split_whitespace()
            .filter_map(|word| word.strip_prefix("console="))
            .any(|value| value == tty || value.strip_prefix(tty).is_some_and(|rest| rest.starts_with(',')))
    }
}

/// The syntax of a configuration file, known from where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    Grub,
    Syslinux,
    LoaderEntry,
}

/// The kernel entries of a configuration file in `syntax`.
pub(crate) fn parse(syntax: Syntax, text: &str) -> Vec<KernelEntry> {
    match syntax {
        Syntax::Grub => grub(text),
        Syntax::Syslinux => syslinux(text),
        Syntax::LoaderEntry => loader_entry(text).into_iter().collect(),
    }
}

/// The first whitespace-separated word of `line` and the rest, trimmed.
fn split_word(line: &str) -> (&str, &str) {
    let line = line.trim();
    match line.find(char::is_whitespace) {
        Some(at) => (&line[..at], line[at..].trim()),
        None => (line, ""),
    }
}

/// The first argument of a GRUB command, unquoted as GRUB's shell-like syntax does: `'Debian'`,
/// `"Live \"x\""`, `'it'\''s'` or a bare word.
fn grub_title(args: &str) -> Option<String> {
    let mut title = String::new();
    let mut quote = None;
    let mut chars = args.trim_start().chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None | Some('"'), '\\') => title.extend(chars.next()),
            (None, c) if c.is_whitespace() || c == '{' => break,
            (_, c) => title.push(c),
        }
    }
    Some(title).filter(|t| !t.is_empty())
}

fn grub(text: &str) -> Vec<KernelEntry> {
    // One element per open brace: the title when it opened a menuentry.
    let mut blocks: Vec<Option<String>> = Vec::new();
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        let (command, args) = split_word(trimmed);
        match command {
            "linux" | "linuxefi" | "linux16" => {
                let (kernel, cmdline) = split_word(args);
                let title = blocks.iter().rev().find_map(|b| b.clone());
                entries.push(KernelEntry { title, kernel: kernel.into(), cmdline: cmdline.into(), line: index + 1 });
            }
            _ if trimmed.ends_with('{') => {
                blocks.push(if command == "menuentry" { grub_title(args) } else { None });
            }
            _ if trimmed.starts_with('}') => {
                blocks.pop();
            }
            _ => {}
        }
    }
    entries
}

#[derive(Default)]
struct Label {
    name: String,
    menu_label: Option<String>,
    kernel: Option<(String, String, usize)>,
    append: Option<(String, usize)>,
}

impl Label {
    fn into_entry(self, default_append: &Option<(String, usize)>) -> Option<KernelEntry> {
        let (kernel, extra, kernel_line) = self.kernel?;
        // COM32 modules (menus, hardware detection, chain loading) are not kernels.
        if kernel.to_ascii_lowercase().ends_with(".c32") {
            return None;
        }
        let (append, line) = self.append.or_else(|| default_append.clone()).unwrap_or((String::new(), kernel_line));
        let append = if append == "-" { String::new() } else { append };
        let cmdline = [extra, append].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
        let title = self.menu_label.or(Some(self.name)).filter(|t| !t.is_empty());
        Some(KernelEntry { title, kernel, cmdline, line })
    }
}

fn syslinux(text: &str) -> Vec<KernelEntry> {
    let mut entries = Vec::new();
    let mut default_append = None;
    let mut label: Option<Label> = None;
    for (index, line) in text.lines().enumerate() {
        let (keyword, rest) = split_word(line);
        let line_no = index + 1;
        match keyword.to_ascii_lowercase().as_str() {
            "label" => {
                entries.extend(label.take().and_then(|l| l.into_entry(&default_append)));
                label = Some(Label { name: rest.into(), ..Label::default() });
            }
            "menu" => {
                let (what, title) = split_word(rest);
                if let (Some(label), true) = (label.as_mut(), what.eq_ignore_ascii_case("label")) {
                    label.menu_label = Some(title.replace('^', ""));
                }
            }
            "kernel" | "linux" => {
                if let Some(label) = label.as_mut() {
                    let (kernel, extra) = split_word(rest);
                    label.kernel = Some((kernel.into(), extra.into(), line_no));
                }
            }
            "append" => match label.as_mut() {
                Some(label) => label.append = Some((rest.into(), line_no)),
                None => default_append = Some((rest.into(), line_no)),
            },
            _ => {}
        }
    }
    entries.extend(label.and_then(|l| l.into_entry(&default_append)));
    entries
}

fn loader_entry(text: &str) -> Option<KernelEntry> {
    let (mut title, mut kernel, mut options, mut line) = (None, None, Vec::new(), None);
    for (index, text_line) in text.lines().enumerate() {
        let (key, value) = split_word(text_line);
        match key {
            "title" => title = Some(value.to_string()),
            "linux" => kernel = Some((value.to_string(), index + 1)),
            "options" => {
                options.push(value);
                line.get_or_insert(index + 1);
            }
            _ => {}
        }
    }
    let (kernel, kernel_line) = kernel?;
    Some(KernelEntry { title, kernel, cmdline: options.join(" "), line: line.unwrap_or(kernel_line) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str, kernel: &str, cmdline: &str, line: usize) -> KernelEntry {
        KernelEntry { title: Some(title.into()), kernel: kernel.into(), cmdline: cmdline.into(), line }
    }

    #[test]
    fn grub_entries_take_their_menuentry_title() {
        let text = "set timeout=0\nif [ x = y ]; then\n  true\nfi\nmenuentry 'Live (amd64)' --class debian {\n  \
                    linux /live/vmlinuz boot=live console=ttyS0,115200n8\n  initrd /live/initrd.img\n}\n\
                    submenu \"More\" {\n  menuentry \"Safe \\\"mode\\\"\" {\n    linuxefi /vmlinuz nomodeset\n  }\n}\n\
                    # linux /commented out\nmenuentry 'it'\\''s' {\n linux16 /k\n}\nmenuentry Bare --id b {\n linux /b\n}\n";
        assert_eq!(
            grub(text),
            [
                entry("Live (amd64)", "/live/vmlinuz", "boot=live console=ttyS0,115200n8", 6),
                entry("Safe \"mode\"", "/vmlinuz", "nomodeset", 11),
                entry("it's", "/k", "", 16),
                entry("Bare", "/b", "", 19)
            ]
        );
    }

    #[test]
    fn syslinux_labels_in_any_case_with_a_default_append() {
        let text = "DEFAULT live\nappend quiet\nUI vesamenu.c32\nLABEL live\n  MENU LABEL ^Live system\n  \
                    KERNEL /live/vmlinuz\n  APPEND initrd=/live/initrd.img boot=live\nlabel plain\n  linux vmlinuz\n\
                    label hdt\n  kernel hdt.c32\nLabel none\n  Kernel /k\n  Append -\n";
        assert_eq!(
            syslinux(text),
            [
                entry("Live system", "/live/vmlinuz", "initrd=/live/initrd.img boot=live", 7),
                entry("plain", "vmlinuz", "quiet", 2),
                entry("none", "/k", "", 14)
            ]
        );
    }

    #[test]
    fn loader_entries_join_their_options() {
        let text =
            "title Arch\nlinux /vmlinuz-linux\ninitrd /initramfs.img\noptions root=LABEL=x\noptions console=ttyS0\n";
        assert_eq!(loader_entry(text), Some(entry("Arch", "/vmlinuz-linux", "root=LABEL=x console=ttyS0", 4)));
        assert_eq!(loader_entry("title efi only\nefi /x.efi\n"), None);
    }

    #[test]
    fn console_matches_the_tty_bare_or_with_options() {
        let with = |cmdline: &str| entry("t", "/k", cmdline, 1);
        assert!(with("quiet console=ttyS0").has_console("ttyS0"));
        assert!(with("console=ttyS0,115200n8 quiet").has_console("ttyS0"));
        assert!(!with("console=ttyS01 console=tty0").has_console("ttyS0"));
        assert!(!with("xconsole=ttyS0 ttyS0").has_console("ttyS0"));
    }
}
