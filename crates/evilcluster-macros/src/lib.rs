//! Derive macros for [evilcluster](https://docs.rs/evilcluster). Use them
//! through `evilcluster` (`evilcluster::prelude::*` brings the derive).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, DeriveInput, LitStr};

/// Makes a type a remote message, with its stable wire tag declared beside it:
///
/// ```ignore
/// #[derive(Message, RemoteMessage, Serialize, Deserialize)]
/// #[rtype(result = "Option<String>")]
/// #[remote(tag = "datastore.get", idempotent)]
/// struct Get(String);
/// ```
///
/// `tag` is required and must not be empty; `idempotent` (optional) marks a
/// message that is safe to handle twice (`RemoteMessage::IDEMPOTENT`).
#[proc_macro_derive(RemoteMessage, attributes(remote))]
pub fn derive_remote_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let mut tag: Option<LitStr> = None;
    let mut idempotent = false;
    for attribute in input.attrs.iter().filter(|a| a.path().is_ident("remote")) {
        attribute.parse_nested_meta(|meta| {
            if meta.path.is_ident("tag") {
                let value: LitStr = meta.value()?.parse()?;
                if value.value().is_empty() {
                    return Err(meta.error("the tag must not be empty"));
                }
                if tag.replace(value).is_some() {
                    return Err(meta.error("`tag` is given twice"));
                }
                Ok(())
            } else if meta.path.is_ident("idempotent") {
                idempotent = true;
                Ok(())
            } else {
                Err(meta.error("expected `tag = \"...\"` or `idempotent`"))
            }
        })?;
    }
    let Some(tag) = tag else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "a remote message needs its stable wire tag: add #[remote(tag = \"...\")]",
        ));
    };
    let name = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::evilcluster::RemoteMessage for #name #type_generics #where_clause {
            const TAG: &'static str = #tag;
            const IDEMPOTENT: bool = #idempotent;
        }
    })
}
