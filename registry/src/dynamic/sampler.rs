//! Text-level negative samplers in a library: the plugin side's
//! [`TextSampler`], the host's [`DynamicSampler`] (its functions checked
//! non-null), [`DynamicSamplerInstance`] and [`HostSampler`], and the
//! export macro, which also exports the library's encoders and objectives
//! ([`super::guest`]).

use super::abi::{
    catch_panics, destroy_boxed, error_string, free_own_string, static_c, status, CreateFn,
    DestroyFn, FreeStringFn, SampleFn, SamplerVTable,
};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use vlmatch_core::{Error, Result};

/// A text-level negative sampler, the plugin side's Rust interface.
pub trait TextSampler: Sized {
    /// From the sampler's `[samplers.<name>]` section, as JSON.
    fn from_config(json: &str) -> std::result::Result<Self, String>;
    /// A negative for `caption`, or `None`. Draw randomness from `seed`.
    fn negative(&mut self, caption: &str, seed: u64) -> Option<String>;
}

/// A sampler found in a loaded library, its functions checked non-null.
pub struct DynamicSampler {
    /// The sampler's name, as the library gives it.
    pub name: String,
    /// The canonical path of the library.
    pub library: String,
    create: CreateFn,
    sample: SampleFn,
    free_string: FreeStringFn,
    destroy: DestroyFn,
}

impl DynamicSampler {
    /// An error of call `call` of this sampler: names the sampler, the
    /// call and the library.
    fn failed(&self, call: &str, message: &str) -> Error {
        Error::plugin(
            &self.name,
            format!("`{call}` failed in library {}: {message}", self.library),
        )
    }

    /// Take a string the library handed out: its text, freed by the library.
    ///
    /// # Safety
    /// `p` is non-null and a NUL-terminated string from this library's
    /// `create`, `sample` or `destroy`, not yet freed.
    unsafe fn take_string(&self, p: *mut c_char) -> Result<String> {
        // SAFETY: as the caller promises.
        let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: `p` came from this library and is freed once, here.
        if unsafe { (self.free_string)(p) } != 0 {
            return Err(self.failed("free_string", "it panicked"));
        }
        Ok(text)
    }
}

/// A live sampler instance behind the C ABI.
pub struct DynamicSamplerInstance {
    spec: &'static DynamicSampler,
    state: *mut c_void,
}

impl DynamicSamplerInstance {
    pub fn new(spec: &'static DynamicSampler, config_json: &str, name: &str) -> Result<Self> {
        let json = CString::new(config_json).map_err(|e| Error::plugin(name, e.to_string()))?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: a NUL-terminated string and a valid out-pointer, as the
        // ABI asks; the library catches its panics.
        let state = unsafe { (spec.create)(json.as_ptr(), &mut error) };
        if state.is_null() {
            let message = if error.is_null() {
                "the library could not create the sampler".to_string()
            } else {
                // SAFETY: the plugin wrote a NUL-terminated string it owns.
                unsafe { spec.take_string(error)? }
            };
            return Err(spec.failed("create", &message));
        }
        Ok(DynamicSamplerInstance { spec, state })
    }

    /// One optional negative per caption.
    pub fn negatives(&self, captions: &[String], seed: u64) -> Result<Vec<Option<String>>> {
        let owned: Vec<CString> = captions
            .iter()
            .map(|c| CString::new(c.replace('\0', " ")).expect("NULs replaced"))
            .collect();
        let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let mut out: Vec<*mut c_char> = vec![std::ptr::null_mut(); captions.len()];
        // SAFETY: `state` came from this library's `create`; both arrays hold
        // `captions.len()` entries; the library catches its panics.
        let error = unsafe {
            (self.spec.sample)(
                self.state,
                ptrs.as_ptr(),
                ptrs.len(),
                seed,
                out.as_mut_ptr(),
            )
        };
        // Take every string written, also on failure, so none leaks.
        let taken: Vec<Result<Option<String>>> = out
            .into_iter()
            .map(|p| {
                // SAFETY: a non-null entry is a string from the plugin.
                (!p.is_null())
                    .then(|| unsafe { self.spec.take_string(p) })
                    .transpose()
            })
            .collect();
        if !error.is_null() {
            // SAFETY: a non-null return is an error string from the plugin.
            let message = unsafe { self.spec.take_string(error)? };
            return Err(self.spec.failed("sample", &message));
        }
        taken.into_iter().collect()
    }
}

/// A dynamic sampler as a [`vlmatch_core::NegativeSampler`]: the batch's
/// captions go to the library, its negatives come back as text and are
/// tokenised here. Each caption goes with its own seed, keyed by its sample
/// (`Forward::random_keys`), so runs stay reproducible and a caption's
/// negative does not depend on how the batch is split over ranks.
pub struct HostSampler {
    instance: DynamicSamplerInstance,
    codec: std::rc::Rc<dyn vlmatch_core::TextCodec>,
}

impl HostSampler {
    pub fn new(
        instance: DynamicSamplerInstance,
        codec: std::rc::Rc<dyn vlmatch_core::TextCodec>,
    ) -> Self {
        HostSampler { instance, codec }
    }
}

impl vlmatch_core::NegativeSampler for HostSampler {
    fn sample(
        &self,
        input: &vlmatch_core::SamplerInput<'_, '_>,
    ) -> Result<vlmatch_core::Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        let seeds = Vec::<i64>::try_from(input.forward.random_keys().to_device(tch::Device::Cpu))?;
        let (mut index, mut texts) = (Vec::new(), Vec::new());
        for (i, (caption, seed)) in batch.captions.iter().zip(seeds).enumerate() {
            let negative = self
                .instance
                .negatives(std::slice::from_ref(caption), seed as u64)?
                .pop()
                .flatten();
            if let Some(negative) = negative {
                index.push(i as i64);
                texts.push(negative);
            }
        }
        Ok(vlmatch_core::Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

impl Drop for DynamicSamplerInstance {
    fn drop(&mut self) {
        // SAFETY: `state` came from `create` and is destroyed once, here.
        let error = unsafe { (self.spec.destroy)(self.state) };
        if !error.is_null() {
            // Drop cannot fail: the failure is reported, not returned.
            // SAFETY: a non-null return is an error string from the plugin.
            let message = unsafe { self.spec.take_string(error) }.unwrap_or_else(|e| e.to_string());
            tracing::error!("{}", self.spec.failed("destroy", &message));
        }
    }
}

/// The functions of `vtable`, each checked non-null: a null one refuses the
/// library, naming the sampler and the function.
pub(crate) fn checked(vtable: &SamplerVTable, name: String, path: &Path) -> Result<DynamicSampler> {
    let null = |what: &str| {
        super::abi::refuse(
            path,
            format!("sampler `{name}`: its `{what}` function is null"),
        )
    };
    Ok(DynamicSampler {
        create: vtable.create.ok_or_else(|| null("create"))?,
        sample: vtable.sample.ok_or_else(|| null("sample"))?,
        free_string: vtable.free_string.ok_or_else(|| null("free_string"))?,
        destroy: vtable.destroy.ok_or_else(|| null("destroy"))?,
        library: path.display().to_string(),
        name,
    })
}

/// Export a library's plugins (a `cdylib`): the encoders and objectives
/// it registers with [`crate::register!`] and the [`TextSampler`] types
/// listed here. `vlmatch_plugin_sdk::export!` calls it.
///
/// ```text
/// vlmatch_registry::export_dynamic_samplers!("color_flip" => ColorFlip);
/// vlmatch_registry::export_dynamic_samplers!(); // registered plugins only
/// ```
///
/// The `@table VERSION, ABI; ...` form sets the reported vlmatch version and
/// ABI by hand; it exists to test that the loader refuses a mismatch.
#[macro_export]
macro_rules! export_dynamic_samplers {
    ($($name:literal => $ty:ty),* $(,)?) => {
        $crate::export_dynamic_samplers!(@table
            $crate::dynamic::VLMATCH_VERSION, $crate::dynamic::ABI_VERSION; $($name => $ty),*);
    };
    (@table $version:expr, $abi:expr; $($name:literal => $ty:ty),*) => {
        #[allow(unused_imports)]
        mod __vlmatch_dynamic {
            use super::*;
            use $crate::dynamic::PluginTable;

            /// The plugin table; null if building it panicked.
            #[no_mangle]
            pub unsafe extern "C" fn vlmatch_plugin_table() -> *const PluginTable {
                $crate::dynamic::guest::table($version, $abi, || {
                    vec![$($crate::dynamic::sampler::vtable_for::<$ty>($name)),*]
                })
            }
        }
    };
}

/// The vtable of sampler type `T` named `name` (for the export macro).
pub fn vtable_for<T: TextSampler>(name: &str) -> SamplerVTable {
    unsafe extern "C" fn create<T: TextSampler>(
        json: *const c_char,
        error: *mut *mut c_char,
    ) -> *mut c_void {
        let made = catch_panics(|| {
            if json.is_null() {
                return Err("no config given".to_string());
            }
            // SAFETY: the host passes a NUL-terminated string.
            let json = unsafe { CStr::from_ptr(json) }.to_string_lossy();
            T::from_config(&json)
        });
        match made {
            Ok(s) => Box::into_raw(Box::new(s)) as *mut c_void,
            Err(e) => {
                if !error.is_null() {
                    // SAFETY: the host passes a valid out-pointer.
                    unsafe { *error = error_string(&e) };
                }
                std::ptr::null_mut()
            }
        }
    }
    unsafe extern "C" fn sample<T: TextSampler>(
        state: *mut c_void,
        captions: *const *const c_char,
        n: usize,
        seed: u64,
        out: *mut *mut c_char,
    ) -> *mut c_char {
        status(|| {
            if state.is_null() || (n > 0 && (captions.is_null() || out.is_null())) {
                return Err("null state or arrays".to_string());
            }
            // SAFETY: `state` came from `create::<T>`; the arrays hold `n` entries.
            let sampler = unsafe { &mut *(state as *mut T) };
            for i in 0..n {
                // SAFETY: entry `i < n` of the host's array.
                let caption = unsafe { CStr::from_ptr(*captions.add(i)) }.to_string_lossy();
                let neg = sampler.negative(&caption, seed.wrapping_add(i as u64));
                let p = neg
                    .and_then(|s| CString::new(s).ok())
                    .map(CString::into_raw)
                    .unwrap_or(std::ptr::null_mut());
                // SAFETY: entry `i < n` of the host's out-array.
                unsafe { *out.add(i) = p };
            }
            Ok(())
        })
    }
    SamplerVTable {
        name: static_c(name),
        create: Some(create::<T>),
        sample: Some(sample::<T>),
        free_string: Some(free_own_string),
        destroy: Some(destroy_boxed::<T>),
    }
}
